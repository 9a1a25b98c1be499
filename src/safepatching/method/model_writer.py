"""Writing a merge: the backbone plus a ``PatchMerger``'s deltas streamed into a standard HF model
folder, with the settings record and a model card beside the weights."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from safepatching import __version__
from safepatching.config.settings import PipelineConfig
from safepatching.errors import SafePatchingError
from safepatching.method.dense import DensePatch
from safepatching.method.geometry import patch_geometry
from safepatching.method.merger import PatchMerger
from safepatching.storage.files import EDIT_FACTORS_FILE, atomic_dir, save_factors, write_json
from safepatching.storage.shards import (
    SETTINGS_FILE,
    PlannedTensor,
    WeightFolder,
    copy_model_files,
    read_ahead,
    write_shards,
)


def write_patched_model(
    base_dir: Path,
    target: Path,
    merger: PatchMerger,
    dtype: torch.dtype | None,
    base_model: str,
    settings_record: dict[str, Any],
    shard_size_mb: int = 2000,
    overwrite: bool = True,
    progress: bool = True,
    edit_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Stream base + merged deltas into a HF model folder, one tensor in memory at a time.

    ``edit_factors``: a directional edit's low-rank factors (already in the merger's deltas), kept
    beside the model as ``edit_factors.safetensors`` so that `export` stores them, not the dense change.

    ``dtype`` None keeps each tensor's stored dtype. ``settings_record`` (the config and the patches'
    provenance) goes to ``safepatching.json`` and the model card. Returns the merge statistics,
    including the share of patched entries whose change rounds away in the output dtype.
    """
    base = WeightFolder(base_dir)
    missing = [name for name in merger.names() if name not in base.tensors]
    if missing:
        raise SafePatchingError(
            f"the base model has no tensor {missing[0]}.", "merge patches into the backbone they came from"
        )
    lost = 0
    plan = [PlannedTensor(name, dtype or info.dtype, info.shape) for name, info in base.tensors.items()]

    tensors = read_ahead(base, list(base.tensors), lambda value: None)
    touched_names = set(merger.names())

    def produce(planned: PlannedTensor) -> torch.Tensor:
        nonlocal lost
        _, value, _ = next(tensors)
        if planned.name not in touched_names:
            return value.to(planned.dtype)
        delta = merger.delta(planned.name)
        if tuple(delta.shape) != planned.shape:
            raise SafePatchingError(
                f"{planned.name} has shape {planned.shape} in the base but {tuple(delta.shape)} in the patch.",
                "merge patches into the backbone they came from",
            )
        touched = delta != 0  # untouched entries keep their exact bits (x + 0.0 would turn -0.0 into 0.0)
        patched = torch.where(touched, value.float() + delta, value.float()).to(planned.dtype)
        lost += int((touched & (patched == value.to(planned.dtype))).sum())
        return patched

    with (
        atomic_dir(target, overwrite=overwrite) as staging,
        tqdm(
            total=base.total_bytes(), unit="B", unit_scale=True, desc="write patched model", disable=not progress
        ) as bar,
    ):
        write_shards(staging, plan, produce, shard_size_mb * 1024 * 1024, progress=bar.update)
        copy_model_files(base.folder, staging)
        if dtype is not None:
            set_config_dtype(staging / "config.json", dtype)
        counts = {**merger.summary(), "rounding_loss_fraction": lost / max(merger.counts["changed"], 1)}
        card = model_card(base_model, settings_record.get("config", {}), {"merge": counts})
        (staging / "README.md").write_text(card, encoding="utf-8")
        write_json(staging / SETTINGS_FILE, {**settings_record, "merge_counts": counts})
        if edit_factors:
            save_factors(staging / EDIT_FACTORS_FILE, edit_factors)
    return counts


def settings_record(config: PipelineConfig, safety: DensePatch, over_safety: DensePatch) -> dict[str, Any]:
    """Provenance kept beside a merged model: every setting, the seed, the training data's hash and
    how the two patches relate (their cosine and sign disagreement)."""
    keys = ("direction", "steps", "stop_reason", "nll_history", "seed", "compute_dtype", "device_profile", "num_pairs",
            "pairs_sha256")  # fmt: skip
    return {
        "safepatching": __version__,
        "base_model": config.model,
        "method": config.merge.method,
        "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "patches": {
            "safety": {k: safety.info.get(k) for k in keys},
            "over_safety": {k: over_safety.info.get(k) for k in keys},
        },
        "geometry": patch_geometry(safety.deltas, over_safety.deltas),
    }


def set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Record the output dtype in config.json so loaders pick the stored precision."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    config.setdefault("dtype", name)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def model_card(base_model: str, settings: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["safepatching", "safety"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {base_model} + SafePatching",
        "",
        f"Made with safepatching {__version__} on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=False).strip(),
        "```",
    ]
    if results:
        lines += ["", "## Results", "", "```yaml", yaml.safe_dump(results, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"
