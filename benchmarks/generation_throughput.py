"""Tokens/s of the batched generation engine against a naive one-prompt-at-a-time `generate` loop.

Both decode greedily the same prompts with the same model and token budget; useful tokens are
counted the same way for both (the decoded replies re-tokenised), so padding and tokens generated
after a sequence finished do not count. Last line: ``speedup: X`` (batched / naive tokens/s).
"""

from __future__ import annotations

import argparse
import time

import torch

from safepatching.config.settings import DatasetSpec
from safepatching.data.chat import chat_prompt
from safepatching.data.sources import load_examples
from safepatching.evaluation.generation import HFGenerator
from safepatching.models.loading import load_model


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def naive_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    replies = []
    for prompt in prompts:
        encoded = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    examples = load_examples(DatasetSpec(source="builtin:benign-but-scary"))
    examples += load_examples(DatasetSpec(source="builtin:harmless"))
    prompts = [e.prompt for e in examples][: args.prompts]

    started = time.perf_counter()
    naive = naive_generate(model, tokenizer, prompts, args.max_new_tokens)
    naive_seconds = time.perf_counter() - started
    started = time.perf_counter()
    batched = HFGenerator(model, tokenizer, args.batch_size, progress=False).generate(prompts, args.max_new_tokens)
    batched_seconds = time.perf_counter() - started

    naive_rate = count_tokens(tokenizer, naive) / naive_seconds
    batched_rate = count_tokens(tokenizer, batched) / batched_seconds
    same = sum(a == b for a, b in zip(naive, batched, strict=True))
    print(
        f"model: {args.model}; prompts: {len(prompts)}; max_new_tokens: {args.max_new_tokens}; "
        f"threads: {torch.get_num_threads()}"
    )
    print(f"naive one-at-a-time generate: {naive_rate:.1f} tokens/s ({naive_seconds:.1f} s)")
    print(f"batched engine (batch {args.batch_size}): {batched_rate:.1f} tokens/s ({batched_seconds:.1f} s)")
    print(f"identical replies: {same}/{len(prompts)} (greedy; batching may flip near-ties)")
    print(f"speedup: {batched_rate / naive_rate:.2f}")


if __name__ == "__main__":
    main()
