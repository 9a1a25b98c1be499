"""Result files of one evaluation or run: metrics.json, records.jsonl and the summary schema."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from safepatching import __version__
from safepatching.config.experiments import BenchConfig, ContinualConfig, DirectionsConfig
from safepatching.models.device import device_memory
from safepatching.models.precision import resolve_dtype
from safepatching.storage.files import write_json, write_text_atomic

SUMMARY_SCHEMA_VERSION = 2  # resources/summary.schema.json


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def save_eval(directory: Path, metrics: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """One evaluation's outputs: metrics.json and a JSONL record of every prompt and judgement."""
    write_jsonl(Path(directory) / "records.jsonl", records)
    write_json(Path(directory) / "metrics.json", metrics)


def summary_schema() -> dict[str, Any]:
    """The JSON Schema of summary.json (and, under $defs/metrics, of each metrics.json)."""
    text = resources.files("safepatching.resources").joinpath("summary.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def result_header(
    config: BenchConfig | ContinualConfig | DirectionsConfig,
    command: str,
    seconds: float,
    complete: bool,
    schema_version: int,
) -> dict[str, Any]:
    """What every bench, continual or directions result starts with: versions, the exact command, the compute
    dtype the run resolved, the device it ran on, timing."""
    return {
        "schema_version": schema_version,
        "safepatching": __version__,
        "name": config.name,
        "command": command,
        "complete": complete,
        "backbone": config.pipeline.model,
        "compute_dtype": resolve_dtype(config.pipeline.compute_dtype),
        "device": device_memory().record(),
        "wall_seconds": round(seconds, 1),
    }
