"""SNIP regions: top-a% / top-b% thresholds over scores, region masks and their difference sets."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def difference_sets(safety_region: torch.Tensor, over_safety_region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M_s = top_a(I_s) minus top_b(I_o) and M_o = top_b(I_o) minus top_a(I_s)."""
    return safety_region & ~over_safety_region, over_safety_region & ~safety_region


def top_threshold(values: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep``-th largest entry: entries at or above it form the top ``keep``."""
    flat = values.reshape(-1).float()
    return flat.kthvalue(flat.numel() - keep + 1).values


def _kth_largest(values: torch.Tensor, percent: float) -> torch.Tensor:
    return top_threshold(values, max(1, math.ceil(values.numel() * percent / 100)))


def global_threshold(scores: Mapping[str, torch.Tensor], percent: float) -> torch.Tensor:
    """The score of the top ``percent`` % entry over all tensors together (needs every score at once)."""
    return _kth_largest(torch.cat([scores[name].reshape(-1).float() for name in scores]), percent)


def region_mask(score: torch.Tensor, percent: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Entries at or above the threshold (this tensor's own top ``percent`` % when none is given).

    Entries tied with the threshold are all kept; entries with score 0 are never kept.
    """
    if threshold is None:
        threshold = _kth_largest(score, percent)
    return (score >= threshold) & (score > 0)


class TopRegion:
    """The top ``percent`` % entries of each tensor by score: over all tensors together (``global``,
    one threshold found once, which needs every score) or per tensor. What the merge uses."""

    def __init__(self, scores: Mapping[str, torch.Tensor], percent: float, scope: str = "per_tensor"):
        self.scores, self.percent = scores, percent
        self.threshold = global_threshold(scores, percent) if scope == "global" else None

    def mask(self, name: str) -> torch.Tensor:
        return region_mask(self.scores[name], self.percent, self.threshold)
