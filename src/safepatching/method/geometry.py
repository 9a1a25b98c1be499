"""How the two patches relate: their cosine overall and per module type, and how often their signs differ.

When the safety and over-safety patches point in nearly opposite directions (a cosine near -1), any
weighted sum of the two is nearly a multiple of one direction, and the merge can only trade one
goal for the other. Every run reports these figures so that can be seen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch


def module_type(name: str) -> str:
    """'model.layers.3.mlp.down_proj.weight' -> 'down_proj'."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def patch_geometry(safety: Mapping[str, torch.Tensor], over_safety: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Cosine of the two patches over all their tensors and per module type, and the share of entries
    both patches change whose signs disagree; one tensor in memory at a time."""
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))  # s.o, s.s, o.o
    disagree = both = 0
    for name in safety:
        s, o = safety[name].reshape(-1).double(), over_safety[name].reshape(-1).double()
        products = torch.stack([s @ o, s @ s, o @ o])
        sums["all"] += products
        sums[module_type(name)] += products
        changed = (s != 0) & (o != 0)
        both += int(changed.sum())
        disagree += int((changed & ((s > 0) != (o > 0))).sum())

    def cosine(values: torch.Tensor) -> float | None:
        norm = float(values[1].sqrt() * values[2].sqrt())
        return float(values[0]) / norm if norm > 0 else None

    return {
        "cosine": cosine(sums.pop("all", torch.zeros(3, dtype=torch.float64))),  # no tensors: None
        "cosine_by_module": {module: cosine(values) for module, values in sorted(sums.items())},
        "sign_disagreement": disagree / both if both else None,
    }


def region_geometry(counts: Mapping[str, int]) -> dict[str, float] | None:
    """Sizes of the two regions, their overlap (Jaccard) and the difference sets, as shares of the
    patched entries, from a merge's counts; None for a merge without regions."""
    entries, shared = counts.get("entries", 0), counts.get("intersection", 0)
    safety = counts.get("safety_only", 0) + shared
    over_safety = counts.get("over_safety_only", 0) + shared
    if not entries or not safety + over_safety:
        return None
    union = safety + over_safety - shared
    return {
        "safety_region": safety / entries,
        "over_safety_region": over_safety / entries,
        "overlap_jaccard": shared / union if union else 0.0,
        "safety_only": counts["safety_only"] / entries,
        "over_safety_only": counts["over_safety_only"] / entries,
    }
