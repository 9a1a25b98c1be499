"""Derivation choices that depend on the device, made when training starts and recorded with the patch.

On a CPU, memory is what runs out and the defaults save it: activations recomputed in the backward
pass, response logits projected 128 rows at a time (each chunk recomputed too) and AdamW one tensor
at a time. On a GPU those savings cost far more time than they save (the reference derivation ran
at 0.39x the Hugging Face Trainer on an H200), so there the logits go in one pass, AdamW is fused,
and activations are recomputed only when the model would not fit in the device's free memory
without. A setting given explicitly always wins over the profile.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from safepatching.config.settings import DeriveConfig
from safepatching.method.memory import GIB, ModelSize, derivation_bytes
from safepatching.method.objectives import LOGIT_ROWS
from safepatching.models.device import DeviceMemory

log = logging.getLogger(__name__)
DEVICE_SPARE_BYTES = 2 * GIB  # left to the CUDA context, the allocator's slack and fragmentation


@dataclass(frozen=True)
class DerivationProfile:
    device: str
    recompute_activations: bool
    logit_rows: int  # 0: every response row in one pass
    optimizer: str
    reasons: tuple[str, ...] = ()

    def record(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


def derivation_profile(derive: DeriveConfig, size: ModelSize, memory: DeviceMemory) -> DerivationProfile:
    """The choices for deriving on ``memory``'s device: each forced setting as given, the rest by device."""
    cuda = memory.kind == "cuda"
    reasons: list[str] = []
    recompute = derive.recompute_activations
    if recompute is None:
        recompute = not cuda
        if cuda:
            needed = derivation_bytes(size, derive, recompute=False)
            if needed > memory.free_bytes - DEVICE_SPARE_BYTES:
                recompute = True
                reasons.append(
                    f"activations are recomputed: without, deriving needs about {needed / GIB:.1f} GiB and "
                    f"{memory.name} has {memory.free_bytes / GIB:.1f} GiB free"
                )
    logit_rows = derive.logit_rows if derive.logit_rows != "auto" else (0 if cuda else LOGIT_ROWS)
    optimizer = derive.optimizer if derive.optimizer != "auto" else ("fused" if cuda else "per_tensor")
    for reason in reasons:
        log.warning(reason)
    return DerivationProfile(memory.kind, recompute, logit_rows, optimizer, tuple(reasons))
