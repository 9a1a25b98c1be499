"""Derivation throughput: float32, the default (float32 masters + autocast), and Hugging Face Trainer.

Each runs the same number of optimizer steps of gradient descent on the same harmful pairs, with
the same batch size, accumulation, sequence length, AdamW settings and trainable tensors (the
attention and MLP projections), starting from the same float32 weights. Trainer gets bf16
autocast (``bf16=True``), as a user of it would. Training tokens per second count every token of
the pairs processed.

Last line: ``speedup: X vs_trainer: Y`` with X = default / float32 and Y = default / Trainer.
``--profile`` also prints where the default derivation's time goes (``torch.profiler``, the ops
with the most self time over its steps) and the share of the float32 derivation's time spent in
matrix products, with the speedup that making only them faster by the hardware's ratio allows
(Amdahl's law), before the last lines. ``--set derive.KEY=VALUE`` (repeatable) changes the
derivation settings all three runs use, e.g. ``--set derive.recompute_activations=false``.
``--repeats N`` times each of the three N times, in an order that rotates every round so that a
shared host's drift falls on all of them, and reports each one's median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from generation_throughput import matmul_flops
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from safepatching.config.loading import build_config, parse_overrides
from safepatching.config.settings import DeriveConfig, ModelLoading, PipelineConfig
from safepatching.data.chat import collate, encode_pair
from safepatching.data.sources import load_pairs
from safepatching.method.derive import derive_patch, target_parameter_names
from safepatching.models.loading import load_model
from safepatching.models.precision import resolve_dtype


def ours(model, tokenizer, pairs, settings: DeriveConfig, dtype: str) -> float:
    started = time.perf_counter()
    patch = derive_patch(model, tokenizer, pairs, "descent", settings, progress=False, compute_dtype=dtype)
    assert patch.info["steps"] == settings.max_steps
    return time.perf_counter() - started


def with_trainer(model, tokenizer, pairs, settings: DeriveConfig) -> float:
    names = set(target_parameter_names(model, settings.target_modules))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    encoded = [encode_pair(tokenizer, p.prompt, p.response or "", settings.max_length) for p in pairs]
    with tempfile.TemporaryDirectory() as out:
        ours_too = {  # the settings derivation uses, so both run the same training
            "per_device_train_batch_size": settings.batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "max_steps": settings.max_steps,
            "learning_rate": settings.learning_rate,
            "max_grad_norm": settings.max_grad_norm,
        }
        quiet = {"report_to": [], "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True}
        arguments = TrainingArguments(
            output_dir=out, weight_decay=0.0, lr_scheduler_type="constant", optim="adamw_torch", bf16=True,
            use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, dataloader_num_workers=0,
            **ours_too, **quiet,
        )  # fmt: skip
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=encoded,
            data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        )
        before = Path(out) / "before.safetensors"  # on disk: a second copy may not fit beside the optimizer
        save_file({name: param.detach() for name, param in model.named_parameters() if name in names}, before)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        del trainer
        with torch.no_grad():  # Trainer trains in place; every run starts from the same weights
            for name, weight in load_file(before).items():
                model.get_parameter(name).copy_(weight)
        return seconds


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def profiled_ops(work):
    """The profiler's per-op averages over one call of ``work``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        work()
    return profiled.key_averages()


def matmul_share(averages) -> float:
    """The share of self CPU time that the matrix-product ops took."""
    total = sum(event.self_cpu_time_total for event in averages)
    return sum(event.self_cpu_time_total for event in averages if event.key in MATMUL_OPS) / total


def interleaved_times(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run's times over ``repeats`` rounds; round r starts at the r-th run, so no run is always
    first (cold) or always after the same neighbour."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            times[name].append(runs[name]())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile the float32 and default derivations")
    parser.add_argument("--set", action="append", default=[], metavar="derive.KEY=VALUE", help="change a setting")
    parser.add_argument("--repeats", type=int, default=1, help="time each run this many times (median)")
    args = parser.parse_args()
    config = build_config(overrides={**parse_overrides(args.set), "model": args.model})
    assert isinstance(config, PipelineConfig)
    settings = config.derive.model_copy(update={"max_steps": args.steps})
    pairs = load_pairs(config.harmful_train_specs())
    model, tokenizer = load_model(args.model, loading=ModelLoading(), training=True)
    lengths = [len(encode_pair(tokenizer, p.prompt, p.response or "", settings.max_length)["input_ids"]) for p in pairs]
    tokens = args.steps * settings.gradient_accumulation_steps * settings.batch_size * statistics.fmean(lengths)
    default_dtype = resolve_dtype(ModelLoading().compute_dtype)

    runs = {
        "float32": lambda: ours(model, tokenizer, pairs, settings, "float32"),
        "default": lambda: ours(model, tokenizer, pairs, settings, default_dtype),
        "trainer": lambda: with_trainer(model, tokenizer, pairs, settings),
    }
    times = interleaved_times(runs, args.repeats)
    fp32_seconds, default_seconds, trainer_seconds = (statistics.median(times[name]) for name in runs)
    if args.profile:
        fp32_table, default_table = profiled_ops(runs["float32"]), profiled_ops(runs["default"])
        print(default_table.table(sort_by="self_cpu_time_total", row_limit=12))
    print(
        f"model: {args.model}; {args.steps} optimizer steps of batch {settings.batch_size} x "
        f"{settings.gradient_accumulation_steps} accumulation, max_length {settings.max_length} "
        f"({tokens:.0f} training tokens); threads: {torch.get_num_threads()}"
    )
    for label, seconds in (
        ("float32", fp32_seconds),
        (f"default ({default_dtype} autocast, float32 masters)", default_seconds),
        ("Hugging Face Trainer (bf16=True)", trainer_seconds),
    ):
        print(f"{label}: {tokens / seconds:.1f} tokens/s ({seconds:.1f} s)")
    if args.repeats > 1:
        print("seconds per repeat: " + "; ".join(f"{name} {', '.join(f'{t:.1f}' for t in times[name])}" for name in runs))
    bf16_flops, fp32_flops = matmul_flops(torch.bfloat16), matmul_flops(torch.float32)
    print(
        f"matmul (512x896 @ 896x4864): bf16 {bf16_flops / 1e9:.0f} GFLOP/s, float32 {fp32_flops / 1e9:.0f} GFLOP/s "
        f"(the hardware's ratio, an upper bound on speedup: {bf16_flops / fp32_flops:.2f})"
    )
    if args.profile:
        share = matmul_share(fp32_table)
        ratio = bf16_flops / fp32_flops
        print(
            f"float32 derivation: matrix products {100 * share:.1f} % of its self CPU time; making only them "
            f"{ratio:.2f}x faster allows a speedup of {1 / (1 - share + share / ratio):.2f} (Amdahl)"
        )
    print(f"speedup: {fp32_seconds / default_seconds:.2f} vs_trainer: {trainer_seconds / default_seconds:.2f}")


if __name__ == "__main__":
    main()
