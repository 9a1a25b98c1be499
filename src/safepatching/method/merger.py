"""Merging two patches tensor by tensor: pure tensor work, no files (``method.model_writer`` streams
the result into a model folder)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from safepatching.config.settings import MergeConfig
from safepatching.errors import SafePatchingError
from safepatching.method.dense import DensePatch
from safepatching.method.merge_methods import MERGE_METHODS, TensorPatches
from safepatching.method.regions import TopRegion, difference_sets
from safepatching.storage.shards import tensor_shapes


def check_compatible(safety: DensePatch, over_safety: DensePatch) -> None:
    if set(safety.deltas) != set(over_safety.deltas):
        raise SafePatchingError("the two patches cover different tensors.", "derive both with the same target_modules")
    safety_shapes, over_safety_shapes = tensor_shapes(safety.deltas), tensor_shapes(over_safety.deltas)
    for name, shape in safety_shapes.items():
        if shape != over_safety_shapes[name]:
            raise SafePatchingError(f"the patches disagree on the shape of {name}.", "derive both from one backbone")


class PatchMerger:
    """Merges the two patches one tensor at a time, so a streaming writer can pull deltas lazily.

    Patches and scores may be in-memory dicts or lazy safetensors mappings. Per-tensor masks need
    only the tensor at hand; a global mask first computes one threshold over all scores.
    """

    def __init__(
        self,
        safety: DensePatch,
        over_safety: DensePatch,
        settings: MergeConfig,
        seed: int,
        safety_scores: Mapping[str, torch.Tensor] | None = None,
        over_safety_scores: Mapping[str, torch.Tensor] | None = None,
        edits: Mapping[str, torch.Tensor] | None = None,
    ):
        """``edits``: further float32 deltas added on top (a directional edit), which may touch
        tensors the patches do not (the input embedding)."""
        check_compatible(safety, over_safety)
        self.safety, self.over_safety, self.settings, self.seed = safety, over_safety, settings, seed
        self.edits = dict(edits or {})
        self.method = MERGE_METHODS[settings.method]
        self.regions: tuple[TopRegion, TopRegion] | None = None
        if self.method.needs_importance and safety.deltas:  # no patch tensors (an edit alone): no regions
            if safety_scores is None or over_safety_scores is None:
                raise SafePatchingError(
                    f"merge method {settings.method!r} needs importance scores.", "run `score` first"
                )
            self.regions = (
                TopRegion(safety_scores, settings.top_a, settings.mask_scope),
                TopRegion(over_safety_scores, settings.top_b, settings.mask_scope),
            )
        self.counts = {"entries": 0, "changed": 0, "safety_only": 0, "over_safety_only": 0, "intersection": 0}

    def names(self) -> list[str]:
        return list(self.safety.deltas) + [name for name in self.edits if name not in self.safety.deltas]

    def delta(self, name: str) -> torch.Tensor:
        """The merged float32 delta for one tensor (plus its edit); statistics accumulate in ``counts``."""
        merged = self.patch_delta(name) if name in self.safety.deltas else None
        if name in self.edits:
            merged = self.edits[name] if merged is None else merged + self.edits[name]
        self.counts["entries"] += merged.numel()
        self.counts["changed"] += int(torch.count_nonzero(merged))
        return merged

    def patch_delta(self, name: str) -> torch.Tensor:
        safety_region = over_safety_region = None
        if self.regions is not None:
            safety_region, over_safety_region = (region.mask(name) for region in self.regions)
        patches = TensorPatches(
            name,
            self.safety.deltas[name].float(),
            self.over_safety.deltas[name].float(),
            safety_region,
            over_safety_region,
        )
        merged = self.method.function(patches, self.settings, self.seed)
        if safety_region is not None:
            only_s, only_o = difference_sets(safety_region, over_safety_region)
            self.counts["safety_only"] += int(only_s.sum())
            self.counts["over_safety_only"] += int(only_o.sum())
            self.counts["intersection"] += int((safety_region & over_safety_region).sum())
        return merged

    def merge_all(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """All merged deltas in memory (for sweeps and tests; ``write_patched_model`` streams instead)."""
        deltas = {name: self.delta(name) for name in self.names()}
        return deltas, self.summary()

    def summary(self) -> dict[str, Any]:
        edited = {"edited_tensors": len(self.edits)} if self.edits else {}
        return {**self.counts, "changed_fraction": self.counts["changed"] / max(self.counts["entries"], 1), **edited}
