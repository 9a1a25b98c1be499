"""The memory derivation and importance scoring need, estimated before any weight is loaded (from the
weight files' headers and the model's config): a backbone too big for the machine fails in one line,
before work is lost.

Both train float32 master weights. Full fine-tuning adds a float32 gradient and AdamW's two float32
moments per target weight (12 bytes); LoRA trains only its adapters, but either ends holding the
dense float32 delta of every target weight (4 bytes). Importance scoring needs a float32 score
accumulator per target weight (4 bytes) beside the masters: each gradient is folded into its score
and freed as soon as backward finishes it. On top come the float32 activations a batch keeps for
backward: every layer's in full when scoring, only each layer's input plus one layer's in full when
derivation recomputes them (``derive.recompute_activations``).
"""

from __future__ import annotations

from dataclasses import dataclass

from safepatching.config.settings import DeriveConfig, ImportanceConfig
from safepatching.errors import ConfigError

GIB = 1 << 30
SPARE_BYTES = 4 * GIB  # left to the system and everything else on the machine
OVERHEAD_BYTES = int(1.5 * GIB)  # runtime, chunked logits, allocator slack, the batch


def is_target(name: str, target_modules: set[str]) -> bool:
    """A weight or bias of a module whose last name component is a target."""
    parts = name.rsplit(".", 2)
    return len(parts) >= 2 and parts[-2] in target_modules and parts[-1] in ("weight", "bias")


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know of a model. The layer shapes come from its config; left at 0
    (a config that does not name them) they leave the activations out."""

    total_params: int
    target_params: int
    hidden_size: int = 0
    intermediate_size: int = 0
    layers: int = 0

    @classmethod
    def of_model(cls, model, target_names: list[str]) -> ModelSize:
        """The size of a loaded model, ``target_names`` being its trained parameters."""
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        return cls.from_config(total, sum(params[n].numel() for n in target_names), model.config.to_dict())

    @classmethod
    def from_config(cls, total_params: int, target_params: int, config: dict) -> ModelSize:
        config = config.get("text_config") or config
        shape = (config.get(key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers"))
        return cls(total_params, target_params, *(value if isinstance(value, int) else 0 for value in shape))


def activation_bytes(size: ModelSize, tokens: int, recompute: bool) -> int:
    """float32 activations a decoder keeps for backward over ``tokens`` tokens: per layer and token about
    ten hidden-sized values (norm inputs and outputs, attention's q, k, v and output, the residuals) and
    four MLP-sized ones (gate, up, the activation and its product)."""
    full_layer = 10 * size.hidden_size + 4 * size.intermediate_size
    kept = size.layers * size.hidden_size + full_layer if recompute else size.layers * full_layer
    return 4 * tokens * kept


def derivation_bytes(size: ModelSize, derive: DeriveConfig, recompute: bool, batches_per_pass: int = 1) -> int:
    """Masters, what training adds per target weight, and the activations a forward pass keeps."""
    trained = (4 if derive.method == "lora" else 12) * size.target_params
    tokens = batches_per_pass * derive.batch_size * derive.max_length
    return 4 * size.total_params + trained + activation_bytes(size, tokens, recompute)


def training_bytes(size: ModelSize, derive: DeriveConfig, importance: ImportanceConfig) -> int:
    """The machine memory derivation and scoring need; on a CPU activations are recomputed unless
    ``derive.recompute_activations`` is false."""
    masters = 4 * size.total_params
    passes = derive.batches_per_pass if derive.batches_per_pass != "auto" else 1  # auto is 1 on a CPU
    recompute = derive.recompute_activations is not False
    derivation = derivation_bytes(size, derive, recompute, batches_per_pass=passes)
    scoring = (
        masters
        + 4 * size.target_params
        + activation_bytes(size, importance.batch_size * importance.max_length, recompute=False)
    )
    return max(derivation, scoring) + OVERHEAD_BYTES


def check_training_fits(
    model: str, size: ModelSize, derive: DeriveConfig, importance: ImportanceConfig, machine_bytes: int
) -> None:
    """Refuse a derivation that would not leave SPARE_BYTES of the machine's memory free."""
    if not derive.memory_check:
        return
    needed = training_bytes(size, derive, importance)
    budget = machine_bytes - SPARE_BYTES
    if needed <= budget:
        return
    lora = training_bytes(size, derive.model_copy(update={"method": "lora"}), importance)
    fix = (
        f"set derive.method=lora (about {lora / GIB:.1f} GiB)"
        if derive.method != "lora" and lora <= budget
        else "use a machine with more memory"
    )
    raise ConfigError(
        f"deriving patches of {model} ({derive.method} fine-tuning) needs about {needed / GIB:.1f} GiB, but this "
        f"machine has {machine_bytes / GIB:.1f} GiB and {SPARE_BYTES / GIB:.0f} GiB are kept spare",
        f"{fix}, or derive.memory_check=false to try anyway",
    )
