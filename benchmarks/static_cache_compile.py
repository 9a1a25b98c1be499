"""Does a static KV cache or torch.compile speed up generation here? Against our engine.

Our engine (the default: dynamic KV cache, rows leave the batch when they end, length buckets, the
shared prompt prefix run once) against Hugging Face ``generate`` with a static KV cache, eager and
with ``torch.compile`` of the model's forward pass, all in the default compute dtype on the same
prompts and token budget. A static cache needs fixed shapes, so ``generate`` gets every prompt
left-padded to one width, in batches of one size (one compilation). Useful tokens are counted as in
generation_throughput.py; compile time is reported apart and not charged to the compiled run.

Last line: ``static_cache: X compile: Y`` with X, Y = tokens/s of static-cache generate, eager and
compiled, divided by our engine's.
"""

from __future__ import annotations

import argparse
import time

import torch
from generation_throughput import GREEDY, benchmark_prompts, count_tokens, timed
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import EvalConfig, ModelLoading
from safepatching.data.chat import chat_prompt
from safepatching.evaluation.generation import HFGenerator
from safepatching.models.loading import load_model
from safepatching.models.precision import compute_device, resolve_dtype


def static_generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], batch: int, width: int, budget: int
) -> list[str]:
    """Greedy replies through ``generate`` with a static cache; every batch padded to ``batch`` rows of
    ``width`` prompt tokens."""
    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    replies: list[str] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # a full batch keeps the compiled shapes
        encoded = tokenizer(
            padded, return_tensors="pt", padding="max_length", max_length=width, add_special_tokens=False
        ).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=budget,
                cache_implementation="static",
                pad_token_id=tokenizer.pad_token_id,
                **GREEDY,
            )
        new = out[: len(chunk), width:]
        replies += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="rows per static-cache batch")
    args = parser.parse_args()
    prompts, budget = benchmark_prompts(args.prompts), args.max_new_tokens
    model, tokenizer = load_model(args.model, loading=ModelLoading())
    width = max(len(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts)

    engine = HFGenerator(model, tokenizer, EvalConfig().batch_size, progress=False)
    ours, ours_seconds = timed(lambda texts: engine.generate(texts, budget), prompts)
    static = lambda texts: static_generate(model, tokenizer, texts, args.batch, width, budget)  # noqa: E731
    eager, eager_seconds = timed(static, prompts)
    model.forward = torch.compile(model.forward)
    started = time.perf_counter()
    static(prompts[: args.batch])  # compiles (the warm-up inside `timed` then runs compiled code)
    compile_seconds = time.perf_counter() - started
    compiled, compiled_seconds = timed(static, prompts)

    rates = {
        name: count_tokens(tokenizer, replies) / seconds
        for name, replies, seconds in (
            ("ours", ours, ours_seconds),
            ("eager", eager, eager_seconds),
            ("compiled", compiled, compiled_seconds),
        )
    }
    print(
        f"model: {args.model}; prompts: {len(prompts)} (padded to {width} tokens for the static cache); "
        f"max_new_tokens: {budget}; dtype: {resolve_dtype('auto')}; device: {compute_device()}; "
        f"threads: {torch.get_num_threads()}"
    )
    print(f"our engine (dynamic cache): {rates['ours']:.1f} tokens/s ({ours_seconds:.1f} s)")
    print(f"generate, static cache, batch {args.batch}: {rates['eager']:.1f} tokens/s ({eager_seconds:.1f} s)")
    print(
        f"generate, static cache + torch.compile: {rates['compiled']:.1f} tokens/s ({compiled_seconds:.1f} s; "
        f"compiling took {compile_seconds:.1f} s)"
    )
    same = sum(a == b for a, b in zip(ours, eager, strict=True))
    print(f"replies identical between our engine and static-cache generate: {same}/{len(prompts)}")
    print(f"static_cache: {rates['eager'] / rates['ours']:.2f} compile: {rates['compiled'] / rates['ours']:.2f}")


if __name__ == "__main__":
    main()
