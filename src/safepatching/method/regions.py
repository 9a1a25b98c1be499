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


RADIX_BITS = 16


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) ordered as the float32 values are (their bits, negatives folded)."""
    bits = (values.reshape(-1).float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def _from_order_key(key: int) -> torch.Tensor:
    bits = key - 2**31
    bits = bits ^ 0x7FFFFFFF if bits < 0 else bits
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0]


def _select_bin(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest entry (1-based) and its rank within that bin."""
    above = torch.cumsum(counts.flip(0), 0)  # entries in this bin or any higher one
    flipped = int(torch.searchsorted(above, torch.tensor(rank)))
    selected = counts.numel() - 1 - flipped
    return selected, rank - (int(above[flipped - 1]) if flipped else 0)


def global_threshold(scores: Mapping[str, torch.Tensor], percent: float) -> torch.Tensor:
    """The score of the top ``percent`` % entry over all tensors together, exactly, holding one tensor
    at a time: a radix select over the scores' float bits, two passes of 16 bits each (concatenating
    every score and sorting it took several GB on the reference backbone)."""
    total = sum(scores[name].numel() for name in scores)
    rank = max(1, math.ceil(total * percent / 100))
    bins = 1 << RADIX_BITS
    high = sum(torch.bincount(_order_keys(scores[name]) >> RADIX_BITS, minlength=bins) for name in scores)
    high_bin, rank = _select_bin(high, rank)
    low = torch.zeros(bins, dtype=torch.long)
    for name in scores:
        keys = _order_keys(scores[name])
        low += torch.bincount(keys[(keys >> RADIX_BITS) == high_bin] & (bins - 1), minlength=bins)
    low_bin, _ = _select_bin(low, rank)
    return _from_order_key((high_bin << RADIX_BITS) | low_bin)


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
