"""The dense derived patch (theta_trained - theta per tensor): its type, files and in-memory application."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safepatching.errors import SafePatchingError
from safepatching.storage.files import atomic_dir, read_json, save_tensors, write_json
from safepatching.storage.shards import LazyTensors

DENSE_TENSORS = "deltas.safetensors"
DENSE_INFO = "derived.json"
LEGACY_DENSE_INFO = "patch.json"  # what derivation wrote before the name was kept for sparse patch files


@dataclass
class DensePatch:
    """Per-tensor weight deltas (theta_trained - theta) of every target tensor, plus the settings that
    produced them: what `derive` writes. The portable, sparse file is `patchfile.SparsePatch`."""

    deltas: Mapping[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def is_dense_patch(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / DENSE_TENSORS).is_file() and any(
        (directory / name).is_file() for name in (DENSE_INFO, LEGACY_DENSE_INFO)
    )


def save_dense_patch(patch: DensePatch, directory: Path, extra_info: dict[str, Any] | None = None) -> None:
    """Write the patch atomically, then drop the derivation checkpoint it no longer needs."""
    with atomic_dir(directory) as staging:
        save_tensors(staging / DENSE_TENSORS, patch.deltas)
        write_json(staging / DENSE_INFO, {**patch.info, **(extra_info or {})})
    shutil.rmtree(checkpoint_dir_for(directory), ignore_errors=True)


def load_dense_patch(directory: Path) -> DensePatch:
    """A saved dense patch (also one written before derived.json had its name), its deltas read from
    disk tensor by tensor when used."""
    directory = Path(directory)
    if not is_dense_patch(directory):
        raise SafePatchingError(
            f"{directory} is not a derived (dense) patch: it has no {DENSE_TENSORS} and {DENSE_INFO}.",
            "pass a folder written by `safepatching derive` (or a run's patches/safety, patches/over_safety)",
        )
    info = directory / DENSE_INFO if (directory / DENSE_INFO).is_file() else directory / LEGACY_DENSE_INFO
    return DensePatch(LazyTensors(directory / DENSE_TENSORS), read_json(info))


def add_deltas(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add each delta to the model's weight of that name, in the weight's dtype."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(device=params[name].device, dtype=params[name].dtype))


def holds_base(
    model: torch.nn.Module, names: list[str], base: Callable[[str], torch.Tensor] | None
) -> Callable[[str], torch.Tensor] | None:
    """``base`` if the model's float32 weights of these names are exactly its values, else None.

    A model given to a stage (a study's float32 master, a continual run's working copy) may or may not
    still hold the backbone's weights; when it does, they can be read back from the files rather than
    from a copy of every target tensor taken now (5 GB at 1.5B parameters)."""
    if base is None:
        return None
    params = dict(model.named_parameters())
    for name in names:
        weight = params[name].detach()
        if weight.dtype != torch.float32 or not torch.equal(base(name).float().to(weight.device), weight):
            return None
    return base


@contextlib.contextmanager
def patched(
    model: torch.nn.Module,
    deltas: Mapping[str, torch.Tensor],
    base: Callable[[str], torch.Tensor] | None = None,
) -> Iterator[torch.nn.Module]:
    """Temporarily add a patch's deltas to the model's weights, restoring them exactly afterwards.

    ``base`` gives a weight's float32 value by name, for a model loaded from those weights: a model
    held in a lower precision then gets round(base + delta), as if the patched float32 model had been
    loaded in that precision, rather than round(round(base) + delta); and the weights are restored
    from ``base`` rather than from a copy taken now (a copy of every patched tensor is GBs)."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in deltas} if base is None else {}
    if base is None:
        add_deltas(model, deltas)
    else:
        with torch.no_grad():
            for name, delta in deltas.items():
                device = params[name].device  # weights, their base and the patch may sit apart (GPU, CPU)
                params[name].copy_(base(name).to(device).float() + delta.to(device).float())
    try:
        yield model
    finally:
        with torch.no_grad():
            for name in deltas:
                params[name].copy_(saved[name] if base is None else base(name))


def checkpoint_dir_for(patch_dir: Path) -> Path:
    """Where derivation of ``patch_dir`` keeps its resumable checkpoint (a hidden sibling)."""
    patch_dir = Path(patch_dir)
    return patch_dir.parent / f".{patch_dir.name}.checkpoint"
