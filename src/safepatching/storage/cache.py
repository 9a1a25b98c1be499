"""The stage cache: a stage's output is reused when its settings' fingerprint has not changed.

Every stage (derivation, importance, merge, evaluation) of every experiment goes through ``cached``,
which also meters the stage's wall time and peak resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
from pydantic import BaseModel

from safepatching import __version__
from safepatching.storage.files import read_json, write_json

T = TypeVar("T")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able settings, used to tell whether a saved stage is still valid."""
    payload = json.dumps([_jsonable(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(part: Any) -> Any:
    return part.model_dump(mode="json") if isinstance(part, BaseModel) else part


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system. glibc keeps freed blocks under
    its (adaptive, up to 32 MB) mmap threshold in its arenas, which holds most per-layer tensors, so
    without a trim a finished stage's memory stays resident and the next stage's peak stacks on it."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def stage_meter(record: dict[str, Any], name: str, poll_seconds: float = 0.2) -> Iterator[None]:
    """Record wall time and peak resident memory (GiB) of a stage into ``record[name]``: all of it
    (RSS), and the part not backed by a file. Weights and patches read through memory maps count in
    RSS while the kernel may drop them again; only the anonymous part must fit in the machine."""
    process = psutil.Process()
    peaks = {"rss": 0, "anonymous": 0}

    def measure() -> None:
        memory = process.memory_info()
        peaks["rss"] = max(peaks["rss"], memory.rss)
        peaks["anonymous"] = max(peaks["anonymous"], memory.rss - memory.shared)

    done = threading.Event()

    def sample() -> None:
        while not done.wait(poll_seconds):
            measure()

    measure()
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        yield
    finally:
        release_memory()
        done.set()
        sampler.join()
        measure()
        record[name] = {
            "wall_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(peaks["rss"] / 2**30, 2),
            "peak_anonymous_gib": round(peaks["anonymous"] / 2**30, 2),
        }


STAGE_FILE = "stage.json"
# How stage keys are made (``experiments.keys``, ``config.identity``). Raise it when a change must
# orphan every cached stage; stages written before it was recorded read as schema 1.
KEY_SCHEMA = 1


def stage_is_fresh(directory: Path, key: str) -> bool:
    """Whether ``directory`` holds a finished stage made from the settings fingerprinted as ``key``
    under this key schema."""
    stage = directory / STAGE_FILE
    if not stage.exists():
        return False
    record = read_json(stage)
    return record.get("fingerprint") == key and record.get("key_schema", 1) == KEY_SCHEMA


def mark_stage(directory: Path, key: str, extra: dict[str, Any] | None = None) -> None:
    record = {"fingerprint": key, "key_schema": KEY_SCHEMA, "safepatching": __version__, **(extra or {})}
    write_json(directory / STAGE_FILE, record)


def stage_record(directory: Path) -> dict[str, Any]:
    """What a finished stage recorded about itself (wall time, peak memory, counts); {} if none."""
    stage = Path(directory) / STAGE_FILE
    return read_json(stage) if stage.exists() else {}


def recorded_wall_seconds(directory: Path) -> float:
    """The wall time the stage in ``directory`` took to compute (0 when it never finished there)."""
    return stage_record(directory).get("wall_seconds", 0.0)


def cached(
    directory: Path,
    key: str,
    produce: Callable[[], T],
    load: Callable[[], T],
    meter: dict[str, Any] | None = None,
    name: str | None = None,
    extra: Callable[[T], dict[str, Any]] | None = None,
    refresh: bool = False,
) -> T:
    """``load()`` when ``directory`` holds a finished stage made from the settings fingerprinted as
    ``key`` (and ``refresh`` is off); otherwise ``produce()`` (which writes the stage's files), metered
    into ``meter[name]``, then marked finished with the meter and ``extra(result)`` recorded beside it."""
    directory = Path(directory)
    if not refresh and stage_is_fresh(directory, key):
        return load()
    record = {} if meter is None else meter
    label = name or directory.name
    with stage_meter(record, label):
        result = produce()
    mark_stage(directory, key, {**(extra(result) if extra else {}), **record[label]})
    return result
