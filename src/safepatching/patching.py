"""Applying patches to a backbone and writing the result as a standard HF model folder."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching import __version__
from safepatching.config import MergeConfig
from safepatching.derive import Patch
from safepatching.errors import SafePatchingError
from safepatching.importance import top_region
from safepatching.io import atomic_dir
from safepatching.merge import MERGE_METHODS, TensorPatches, difference_sets


def check_compatible(safety: Patch, over_safety: Patch) -> None:
    if safety.deltas.keys() != over_safety.deltas.keys():
        raise SafePatchingError("the two patches cover different tensors.", "derive both with the same target_modules")
    for name, delta in safety.deltas.items():
        if delta.shape != over_safety.deltas[name].shape:
            raise SafePatchingError(f"the patches disagree on the shape of {name}.", "derive both from one backbone")


def merge_patches(
    safety: Patch,
    over_safety: Patch,
    settings: MergeConfig,
    seed: int,
    safety_scores: dict[str, torch.Tensor] | None = None,
    over_safety_scores: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Combine the two patches with the configured method; returns per-tensor deltas and statistics."""
    check_compatible(safety, over_safety)
    method = MERGE_METHODS[settings.method]
    safety_region = over_safety_region = None
    if method.needs_importance:
        if safety_scores is None or over_safety_scores is None:
            raise SafePatchingError(f"merge method {settings.method!r} needs importance scores.", "run `score` first")
        safety_region = top_region(safety_scores, settings.top_a, settings.mask_scope)
        over_safety_region = top_region(over_safety_scores, settings.top_b, settings.mask_scope)
    merged: dict[str, torch.Tensor] = {}
    counts = {"entries": 0, "changed": 0, "safety_only": 0, "over_safety_only": 0, "intersection": 0}
    for name in safety.deltas:
        patches = TensorPatches(
            name,
            safety.deltas[name].float(),
            over_safety.deltas[name].float(),
            None if safety_region is None else safety_region[name],
            None if over_safety_region is None else over_safety_region[name],
        )
        merged[name] = method.function(patches, settings, seed)
        counts["entries"] += merged[name].numel()
        counts["changed"] += int(torch.count_nonzero(merged[name]))
        if safety_region is not None:
            only_s, only_o = difference_sets(safety_region[name], over_safety_region[name])
            counts["safety_only"] += int(only_s.sum())
            counts["over_safety_only"] += int(only_o.sum())
            counts["intersection"] += int((safety_region[name] & over_safety_region[name]).sum())
    counts["changed_fraction"] = counts["changed"] / max(counts["entries"], 1)
    return merged, counts


def apply_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add deltas to the model's parameters in place."""
    params = dict(model.named_parameters())
    missing = [name for name in deltas if name not in params]
    if missing:
        raise SafePatchingError(
            f"the model has no tensor {missing[0]}.", "apply patches to the backbone they came from"
        )
    with torch.no_grad():
        for name, delta in deltas.items():
            if params[name].shape != delta.shape:
                raise SafePatchingError(
                    f"{name} has shape {tuple(params[name].shape)} but the patch has {tuple(delta.shape)}.",
                    "apply patches to the backbone they came from",
                )
            params[name].add_(delta.to(params[name].dtype))


def rounding_loss(base: torch.nn.Module, deltas: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Fraction of changed entries whose change vanishes when the model is stored in ``dtype``."""
    params = dict(base.named_parameters())
    changed = lost = 0
    for name, delta in deltas.items():
        touched = delta != 0
        before = params[name].detach().to(dtype)
        after = (params[name].detach().float() + delta).to(dtype)
        changed += int(touched.sum())
        lost += int((touched & (before == after)).sum())
    return lost / max(changed, 1)


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


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    card: str,
    dtype: torch.dtype,
    shard_size_mb: int = 2000,
    overwrite: bool = True,
) -> None:
    """Write weights (safetensors), config, generation config, tokenizer and card atomically."""
    state = {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}
    previous = model.config.dtype
    model.config.dtype = dtype
    try:
        with atomic_dir(target, overwrite=overwrite) as staging:
            model.save_pretrained(staging, state_dict=state, max_shard_size=f"{shard_size_mb}MB")
            tokenizer.save_pretrained(staging)
            (staging / "README.md").write_text(card, encoding="utf-8")
    finally:
        model.config.dtype = previous
