"""Generation throughput: a naive float32 loop, our engine in float32, our engine with the defaults.

All three decode greedily the same prompts with the same token budget; useful tokens are counted
the same way for each (the decoded replies re-tokenised), so padding and tokens generated after a
reply ended do not count. The bf16 matmul rate of this machine is measured in the same run, which
gives the share of the hardware's limit the default engine reaches (2 FLOPs per parameter per token).

Last line: ``speedup: X vs_fp32: Y limit_fraction: Z`` with X = default engine / naive loop,
Y = default engine / float32 engine at batch 16 (the earlier default), Z = default engine's tokens/s
x 2 x parameters / bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from safepatching.config.settings import DatasetSpec, EvalConfig, ModelLoading
from safepatching.data.chat import chat_prompt
from safepatching.data.sources import load_examples
from safepatching.evaluation.generation import HFGenerator
from safepatching.models.loading import load_model
from safepatching.models.precision import compute_device, resolve_dtype


def benchmark_prompts(count: int) -> list[str]:
    """Benign-but-scary, harmful and harmless prompts from the built-in sets (no data directory)."""
    examples = [
        *load_examples(DatasetSpec(source="builtin:benign-but-scary")),
        *load_examples(DatasetSpec(source="builtin:uncensorbench", split="train[100:]", shuffle_seed=0)),
        *load_examples(DatasetSpec(source="builtin:harmless")),
    ]
    return [e.prompt for e in examples][:count]


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def naive_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    replies = []
    for prompt in prompts:
        encoded = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).to(
            model.device
        )
        with torch.inference_mode():
            out = model.generate(
                **encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **GREEDY
            )
        replies.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return replies


def matmul_flops(dtype: torch.dtype, shape: tuple[int, int, int] = (512, 896, 4864), seconds: float = 3.0) -> float:
    """Sustained FLOP/s of (m x k) @ (k x n) in ``dtype`` (the reference backbone's MLP shape) on the
    device the models compute on."""
    m, k, n = shape
    device = compute_device()
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        runs += 10
    return 2 * m * k * n * runs / (time.perf_counter() - started)


def timed(generate: Callable[[list[str]], list[str]], prompts: list[str]) -> tuple[list[str], float]:
    """The replies and their wall time, after a two-prompt warm-up (a GPU loads each dtype's
    kernels on first use)."""
    generate(prompts[:2])
    started = time.perf_counter()
    replies = generate(prompts)
    return replies, time.perf_counter() - started


def throughput_arguments(doc: str, max_new_tokens: int) -> argparse.Namespace:
    """The options every throughput benchmark takes: the model, how many prompts, the token budget."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    return parser.parse_args()


def main() -> None:
    args = throughput_arguments(__doc__, max_new_tokens=32)
    prompts = benchmark_prompts(args.prompts)
    default_dtype = resolve_dtype(ModelLoading().compute_dtype)
    default_batch = EvalConfig().batch_size
    budget = args.max_new_tokens

    fp32_model, tokenizer = load_model(args.model, loading=ModelLoading(compute_dtype="float32"))
    naive, naive_seconds = timed(partial(naive_generate, fp32_model, tokenizer, max_new_tokens=budget), prompts)
    engine_fp32 = HFGenerator(fp32_model, tokenizer, 16, progress=False)
    fp32_replies, fp32_seconds = timed(partial(engine_fp32.generate, max_new_tokens=budget), prompts)
    parameters = sum(p.numel() for p in fp32_model.parameters())
    del fp32_model, engine_fp32
    model, _ = load_model(args.model, loading=ModelLoading())
    engine = HFGenerator(model, tokenizer, default_batch, progress=False)
    replies, seconds = timed(partial(engine.generate, max_new_tokens=budget), prompts)
    bf16_flops, fp32_flops = matmul_flops(torch.bfloat16), matmul_flops(torch.float32)

    naive_rate = count_tokens(tokenizer, naive) / naive_seconds
    fp32_rate = count_tokens(tokenizer, fp32_replies) / fp32_seconds
    rate = count_tokens(tokenizer, replies) / seconds
    same = sum(a == b for a, b in zip(fp32_replies, replies, strict=True))
    print(
        f"model: {args.model} ({parameters / 1e6:.0f} M parameters); prompts: {len(prompts)}; "
        f"max_new_tokens: {args.max_new_tokens}; device: {compute_device()}; threads: {torch.get_num_threads()}"
    )
    print(f"naive one-at-a-time generate, float32: {naive_rate:.1f} tokens/s ({naive_seconds:.1f} s)")
    print(f"engine, float32, batch 16: {fp32_rate:.1f} tokens/s ({fp32_seconds:.1f} s)")
    print(f"engine, defaults ({default_dtype}, batch {default_batch}): {rate:.1f} tokens/s ({seconds:.1f} s)")
    print(
        f"matmul (512x896 @ 896x4864): bf16 {bf16_flops / 1e9:.0f} GFLOP/s, float32 {fp32_flops / 1e9:.0f} GFLOP/s "
        f"(the hardware's ratio: {bf16_flops / fp32_flops:.2f})"
    )
    print(f"replies identical between float32 and defaults: {same}/{len(prompts)}")
    limit = rate * 2 * parameters / bf16_flops
    print(f"speedup: {rate / naive_rate:.2f} vs_fp32: {rate / fp32_rate:.2f} limit_fraction: {limit:.2f}")


if __name__ == "__main__":
    main()
