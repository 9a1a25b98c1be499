"""The memory derivation and importance scoring need, estimated from parameter counts before any
weight is loaded: a backbone too big for the machine fails in one line, before work is lost.

Both train float32 master weights. Full fine-tuning adds a float32 gradient and AdamW's two
float32 moments per target weight (12 bytes); LoRA trains only its adapters. Importance scoring
then needs a float32 score accumulator per target weight (4 bytes) beside the masters, whatever the
method: each gradient is folded into its score and freed as soon as backward finishes it.
"""

from __future__ import annotations

from safepatching.config.settings import DeriveConfig
from safepatching.errors import ConfigError

GIB = 1 << 30
SPARE_BYTES = 4 * GIB  # left to the system and everything else on the machine
OVERHEAD_BYTES = int(1.5 * GIB)  # runtime, activations under recomputation, chunked logits, the batch


def is_target(name: str, target_modules: set[str]) -> bool:
    """A weight or bias of a module whose last name component is a target."""
    parts = name.rsplit(".", 2)
    return len(parts) >= 2 and parts[-2] in target_modules and parts[-1] in ("weight", "bias")


def training_bytes(total_params: int, target_params: int, settings: DeriveConfig) -> int:
    masters = 4 * total_params
    derive = masters if settings.method == "lora" else masters + 12 * target_params
    importance = masters + 4 * target_params
    return max(derive, importance) + OVERHEAD_BYTES


def check_training_fits(model: str, total_params: int, target_params: int, settings: DeriveConfig, machine_bytes: int):
    """Refuse a derivation that would not leave SPARE_BYTES of the machine's memory free."""
    if not settings.memory_check:
        return
    needed = training_bytes(total_params, target_params, settings)
    budget = machine_bytes - SPARE_BYTES
    if needed <= budget:
        return
    lora = settings.model_copy(update={"method": "lora"})
    fix = (
        f"set derive.method=lora (about {training_bytes(total_params, target_params, lora) / GIB:.1f} GiB)"
        if settings.method != "lora" and training_bytes(total_params, target_params, lora) <= budget
        else "use a machine with more memory"
    )
    raise ConfigError(
        f"deriving patches of {model} ({settings.method} fine-tuning) needs about {needed / GIB:.1f} GiB, but this "
        f"machine has {machine_bytes / GIB:.1f} GiB and {SPARE_BYTES / GIB:.0f} GiB are kept spare",
        f"{fix}, or derive.memory_check=false to try anyway",
    )
