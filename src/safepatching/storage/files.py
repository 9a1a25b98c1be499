"""Crash-safe file output: everything is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from safepatching.errors import SafePatchingError


@contextlib.contextmanager
def disk_errors(target: Path) -> Iterator[None]:
    """Turn a full disk (or quota) during a write into a one-line error; callers remove partial output."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SafePatchingError(
                f"no space left on the device while writing {target}.", "free disk space or choose another output path"
            ) from None
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block completes."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise SafePatchingError(f"{target} already exists.", "pass --force to overwrite it or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; outputs should be as readable as any folder
    try:
        with disk_errors(target):
            yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def link_dir(source: Path, target: Path) -> None:
    """Make ``target`` a copy of the flat folder ``source`` by hard links (a copy where links cannot
    cross devices): the files are never rewritten in place, only replaced, so the copies stay apart."""
    with atomic_dir(target) as staging:
        for path in Path(source).iterdir():
            if path.is_file():
                try:
                    os.link(path, staging / path.name)
                except OSError:
                    shutil.copy2(path, staging / path.name)


FILE_MODE = 0o644  # mkstemp makes files private; outputs should be as readable as any file


def with_extension(path: Path, extension: str) -> Path:
    """``path`` with ``.extension`` added, where ``with_suffix`` would cut a name that holds a dot
    (``tune-1.5b`` is not ``tune-1`` with suffix ``.5b``)."""
    return path.with_name(f"{path.name}.{extension}")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, FILE_MODE)
    try:
        with disk_errors(path), os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafePatchingError(f"{path} does not exist.", "check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SafePatchingError(f"{path} is not valid JSON ({exc}).", "regenerate the file") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with disk_errors(path):
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)  # after writing: safetensors recreates the file as private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SafePatchingError(f"{path} does not exist.", "check the path or rerun the stage") from None
    except (SafetensorError, OSError) as exc:
        raise SafePatchingError(
            f"{path} is not a readable safetensors file ({exc}).", "delete it and rerun the stage that makes it"
        ) from None


def folder_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take (0 when it does not exist)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# A directional edit's low-rank factors, kept inside a merged model's folder (in its safepatching/
# subfolder, which no weight loader reads and apply/revert do not copy).
EDIT_FACTORS_FILE = "safepatching/edit_factors.safetensors"


def save_factors(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Per-tensor low-rank factors (rows [rank, m], columns [rank, n]) as one safetensors file."""
    flat = {}
    for name, (rows, columns) in factors.items():
        flat[f"{name}/rows"], flat[f"{name}/columns"] = rows.contiguous(), columns.contiguous()
    save_tensors(path, flat)


def load_factors(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    flat = load_tensors(path)
    names = {key.rsplit("/", 1)[0] for key in flat}
    return {name: (flat[f"{name}/rows"], flat[f"{name}/columns"]) for name in names}
