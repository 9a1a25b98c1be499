"""Derivation choices that depend on the device, made when training starts and recorded with the patch.

On a CPU, memory is what runs out and the defaults save it: activations recomputed in the backward
pass, response logits projected 128 rows at a time (each chunk recomputed too) and AdamW one tensor
at a time. On a GPU those savings cost far more time than they save (the reference derivation ran
at 0.39x the Hugging Face Trainer on an H200), so there the logits go in one pass, AdamW is fused,
activations are recomputed only when the model would not fit in the device's free memory without,
and as many of a step's accumulated batches as fit in that memory go through the model in one
pass (small batches leave a GPU idle). A setting given explicitly always wins over the profile.
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
    batches_per_pass: int = 1  # accumulated batches that share a forward pass
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
    passes = derive.batches_per_pass
    if passes == "auto":
        passes = _batches_that_fit(derive, size, memory, recompute) if cuda else 1
    for reason in reasons:
        log.warning(reason)
    if passes > 1:
        log.info("derivation puts %d batches of %d pairs in each forward pass", passes, derive.batch_size)
    return DerivationProfile(memory.kind, recompute, logit_rows, optimizer, passes, tuple(reasons))


def _batches_that_fit(derive: DeriveConfig, size: ModelSize, memory: DeviceMemory, recompute: bool) -> int:
    """The most of a step's batches (a divisor of the accumulation steps, so every optimizer step
    sees the same batches) whose pass fits in the device's free memory; at least one."""
    steps = derive.gradient_accumulation_steps
    room = memory.free_bytes - DEVICE_SPARE_BYTES
    fitting = [n for n in range(1, steps + 1) if steps % n == 0 and derivation_bytes(size, derive, recompute, n) <= room]
    return max(fitting, default=1)
