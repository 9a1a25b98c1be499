"""Which compute dtype a run uses: ``auto`` is bfloat16 where the hardware multiplies it fast (a CUDA
device with bf16 support; a CPU with AMX-BF16 or AVX512-BF16, read from its feature flags) and
float32 elsewhere. A dtype the hardware can only emulate slowly is refused, not silently used.

Training never runs on low-precision weights: derivation and importance keep float32 master weights
and use the compute dtype under autocast (bf16 keeps 8 mantissa bits, too few for AdamW's small
updates). Evaluation runs on weights in the compute dtype.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from safepatching.config.settings import ModelLoading
from safepatching.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
CPU_FP16_FLAGS = {"amx_fp16", "avx512_fp16"}


@functools.cache
def cpuinfo(*keys: str) -> str:
    """The value of the first Linux /proc/cpuinfo line starting with one of ``keys``; empty where
    there is none or the file cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.startswith(keys)), "")
    return line.partition(":")[2].strip()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags; empty where they cannot be read."""
    return frozenset(cpuinfo("flags", "Features").split())


def compute_device() -> str:
    """Where models compute: a CUDA device when one is present (derivation runs there through
    Accelerate, vLLM generates there), the CPU otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_dtypes(device: str | None = None) -> list[str]:
    """The compute dtypes the device runs at full speed, float32 always among them."""
    device = device or compute_device()
    fast = ["float32"]
    if device == "cuda":
        fast.append("float16")
        if torch.cuda.is_bf16_supported():
            fast.append("bfloat16")
    else:
        flags = cpu_flags()
        if flags & CPU_BF16_FLAGS:
            fast.append("bfloat16")
        if flags & CPU_FP16_FLAGS:
            fast.append("float16")
    return fast


def resolve_dtype(requested: str, device: str | None = None) -> str:
    """``auto`` as bfloat16 or float32; an explicit dtype only where the device runs it fast."""
    device = device or compute_device()
    fast = fast_dtypes(device)
    if requested == "auto":
        return "bfloat16" if "bfloat16" in fast else "float32"
    if requested not in fast:
        raise ModelError(
            f"compute_dtype {requested} has no fast path on this {device} (it runs {', '.join(fast)} fast).",
            "set compute_dtype: auto (bfloat16 where the hardware runs it fast, float32 elsewhere) or float32",
        )
    return requested


def resolved(loading: ModelLoading) -> ModelLoading:
    """``loading`` with its compute dtype resolved for this machine."""
    return loading.model_copy(update={"compute_dtype": resolve_dtype(loading.compute_dtype)})


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``model``'s parameters to ``dtype`` in place, keeping its float32 buffers. ``Module.to``
    would round those too (the rotary embedding's inverse frequencies), which a model loaded in
    ``dtype`` keeps in float32: the same weights then generate differently (on the reference backbone
    logits moved by up to 0.25 and 27 % of a bench cell's replies changed)."""
    kept = {name: buffer for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}
    model.to(dtype)
    for name, buffer in kept.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer)
    return model


def hold_output_layer_in(model: torch.nn.Module, dtype: torch.dtype, targets: list[str]) -> None:
    """Keep an untied, untrained output projection in the autocast dtype. Training under autocast
    casts it to that dtype on every forward anyway, so holding it there gives the same numbers and
    saves its float32 copy and the per-step cast (0.5 GB on the reference backbone)."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if dtype == torch.float32 or output is None or output.weight is inputs.weight:
        return
    name = next(n for n, module in model.named_modules() if module is output)
    if not any(target == name or name.endswith(f".{target}") for target in targets):
        output.to(dtype)
