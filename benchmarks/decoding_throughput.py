"""Decoding-time defences: their cost against plain greedy decoding, in the same run.

Self-CD and ROSE decode with two streams of one model (two system prompts), so each step needs two
forward passes' worth of work: their cost is at least that of plain greedy decoding and ideally
below twice it. All three decode the same prompts with the same token budget, with the defaults
(dtype, batch size), on the same engine; the cost is wall time divided by the number of generated
tokens, relative to greedy decoding's.

Last line: ``self_cd_cost: X rose_cost: Y`` (seconds per generated token / greedy's).
"""

from __future__ import annotations

import time

from generation_throughput import benchmark_prompts, throughput_arguments

from safepatching.config.settings import DecodingConfig, EvalConfig, ModelLoading
from safepatching.evaluation.decoding import make_generator
from safepatching.models.loading import load_model
from safepatching.models.precision import compute_device


def seconds_per_token(generator, prompts: list[str], max_new_tokens: int) -> tuple[float, float]:
    """Seconds per generated token and total seconds, after a two-prompt warm-up."""
    generator.generate(prompts[:2], max_new_tokens)
    tokens_before = generator.generated_tokens
    started = time.perf_counter()
    generator.generate(prompts, max_new_tokens)
    seconds = time.perf_counter() - started
    return seconds / (generator.generated_tokens - tokens_before), seconds


def main() -> None:
    args = throughput_arguments(__doc__, max_new_tokens=24)
    prompts = benchmark_prompts(args.prompts)
    model, tokenizer = load_model(args.model, loading=ModelLoading())
    batch = EvalConfig().batch_size
    costs = {}
    for method in ("greedy", "self-cd", "rose"):
        generator = make_generator(model, tokenizer, DecodingConfig(method=method), batch, progress=False)
        costs[method], seconds = seconds_per_token(generator, prompts, args.max_new_tokens)
        print(f"{method}: {1 / costs[method]:.1f} tokens/s ({seconds:.1f} s)")
    print(
        f"model: {args.model}; prompts: {len(prompts)}; max_new_tokens: {args.max_new_tokens}; "
        f"batch: {batch}; device: {compute_device()}"
    )
    print(f"self_cd_cost: {costs['self-cd'] / costs['greedy']:.2f} rose_cost: {costs['rose'] / costs['greedy']:.2f}")


if __name__ == "__main__":
    main()
