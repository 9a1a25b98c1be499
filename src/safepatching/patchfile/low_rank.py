"""Low-rank entries of a portable patch: a tensor's change stored as factors (a directional edit of
every residual writer is a few vectors, where its dense change is every entry of the matrix).

Applying adds sum_k rows[k] (x) columns[k], computed rank by rank in float32 (the same bits on every
machine), to each entry it changes, then rounds to the tensor's dtype, as the merge wrote it.
Rounding does not always invert: where the product is large against an entry, several bases round
onto one patched value, and subtracting the product may land some steps of the dtype from the base.
The reverter can tell which entries those are from the patched tensor and the factors alone
(`ambiguous`), so the patch keeps one signed step count per such entry (``revert_steps``, int8, in
flat order, no index; -128 defers to the next of ``far_steps``, int32). Steps count representable
values in order, across zero too. Entries the factors do not take exactly onto the patched tensor are
kept as exact before/after values. Apply and revert stay bit-exact.
"""

from __future__ import annotations

import torch

from safepatching.method.directions import low_rank_delta

Factors = tuple[torch.Tensor, torch.Tensor]
FAR = -128  # a step that does not fit int8: the next entry of far_steps holds it
MAX_FAR_STEP = 2**31 - 1  # a base further away still is kept as an exact entry


def bit_pattern(values: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 != 0.0 and NaN == NaN when comparing."""
    return values.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()])


def ordinals(values: torch.Tensor) -> torch.Tensor:
    """Each value's place among its dtype's values in order (int64): neighbours differ by one, -0.0 and
    +0.0 included, so a step count crosses zero."""
    bits = bit_pattern(values).long()
    magnitude = bits & (2 ** (8 * values.element_size() - 1) - 1)
    return torch.where(bits < 0, -magnitude - 1, magnitude)


def from_ordinals(places: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = torch.finfo(dtype).bits
    bits = torch.where(places < 0, (-places - 1) | -(2 ** (width - 1)), places)  # the sign bit, as an int64
    return bits.to({16: torch.int16, 32: torch.int32, 64: torch.int64}[width]).view(dtype)


def shifted(values: torch.Tensor, low: torch.Tensor, sign: int) -> torch.Tensor:
    """``values`` plus (sign 1) or minus (sign -1) the float32 product ``low``, in the values' dtype;
    entries the product leaves at zero keep their exact bits."""
    moved = values.float() + low if sign > 0 else values.float() - low
    return torch.where(low != 0, moved, values.float()).to(values.dtype)


def apply_low_rank(values: torch.Tensor, factors: Factors) -> torch.Tensor:
    return shifted(values, low_rank_delta(*factors), 1)


def ambiguous(after: torch.Tensor, reverted: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Flat mask of the entries where ``reverted`` (``after`` less the product) need not be the base:
    it does not map forward onto ``after``, or a neighbouring value of its dtype does too."""
    target, bits = bit_pattern(after).reshape(-1), bit_pattern(reverted)

    def lands(candidate: torch.Tensor) -> torch.Tensor:
        return bit_pattern(shifted(candidate, low, 1)).reshape(-1) == target

    return ~lands(reverted) | lands((bits + 1).view(after.dtype)) | lands((bits - 1).view(after.dtype))


RevertSteps = tuple[torch.Tensor, torch.Tensor]  # (int8 steps, int32 far steps)


def revert_low_rank(after: torch.Tensor, factors: Factors, steps: RevertSteps | None) -> torch.Tensor:
    """``after`` less the factors' product, with each ambiguous entry moved by its stored step
    (``steps`` None: a patch written before steps existed, whose exact entries cover every such one).
    A tensor other than the patch's own (a forced mismatch) has other ambiguous entries: its steps
    are then left out, and only the product is subtracted."""
    low = low_rank_delta(*factors)
    reverted = shifted(after, low, -1)
    flagged = ambiguous(after, reverted, low) if steps is not None else None
    if flagged is None or int(flagged.sum()) != steps[0].numel():
        return reverted
    near, far = steps[0].long(), steps[1].long()
    if int((near == FAR).sum()) != far.numel():
        return reverted
    near[near == FAR] = far
    flat = reverted.reshape(-1)
    flat[flagged] = from_ordinals(ordinals(flat[flagged]) + near, after.dtype)
    return reverted


def low_rank_change(before: torch.Tensor, after: torch.Tensor, factors: Factors) -> tuple[RevertSteps, torch.Tensor]:
    """(revert steps, flat indices of the exact entries) of a change the factors stand for."""
    low = low_rank_delta(*factors)
    exact = bit_pattern(shifted(before, low, 1)).reshape(-1) != bit_pattern(after).reshape(-1)
    reverted = shifted(after, low, -1)
    flagged = torch.nonzero(ambiguous(after, reverted, low)).reshape(-1)
    offset = ordinals(before.reshape(-1)[flagged]) - ordinals(reverted.reshape(-1)[flagged])
    fits = (offset.abs() <= MAX_FAR_STEP) & ~exact[flagged]
    exact[flagged[~fits]] = True
    offset = torch.where(fits, offset, 0)
    far = offset.abs() > 127
    near = torch.where(far, FAR, offset).to(torch.int8)
    return (near, offset[far].to(torch.int32)), torch.nonzero(exact).reshape(-1)
