"""Low-rank entries of a portable patch: a tensor's change stored as factors (a directional edit of
every residual writer is a few vectors, where its dense change is every entry of the matrix).

Applying adds sum_k rows[k] (x) columns[k], computed rank by rank in float32 (the same bits on every
machine), to each entry it changes, then rounds to the tensor's dtype, as the merge wrote it.
Rounding does not always invert: the entries where the factors do not map the base exactly onto the
patched tensor, or back, are kept as exact before/after values, so apply and revert stay bit-exact.
"""

from __future__ import annotations

import torch

from safepatching.method.directions import low_rank_delta

Factors = tuple[torch.Tensor, torch.Tensor]


def bit_pattern(values: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 != 0.0 and NaN == NaN when comparing."""
    return values.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()])


def apply_low_rank(values: torch.Tensor, factors: Factors, sign: int = 1) -> torch.Tensor:
    """``values`` plus (sign 1) or minus (sign -1) the factors' product, in the values' dtype;
    entries the product leaves at zero keep their exact bits."""
    low = low_rank_delta(*factors)
    shifted = values.float() + low if sign > 0 else values.float() - low
    return torch.where(low != 0, shifted, values.float()).to(values.dtype)


def inexact_entries(before: torch.Tensor, after: torch.Tensor, factors: Factors) -> torch.Tensor:
    """Flat indices where the factors do not take ``before`` exactly to ``after`` or back."""
    forward = bit_pattern(apply_low_rank(before, factors, 1).reshape(-1)) != bit_pattern(after.reshape(-1))
    backward = bit_pattern(apply_low_rank(after, factors, -1).reshape(-1)) != bit_pattern(before.reshape(-1))
    return torch.nonzero(forward | backward).reshape(-1)
