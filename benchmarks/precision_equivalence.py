"""How far the default compute dtype moves results from float32, on the same machine and prompts.

- Refusal decisions (three-way judge) on harmful prompts (AdvBench) and benign-but-scary prompts
  (XSTest-safe), float32 against the default dtype: the share of prompts whose decision agrees.
- Mean per-token KL(float32 || default) on the built-in harmless prompts, teacher-forced on the
  float32 model's own replies (what the evaluation's KL to the backbone measures).
- The cosine similarity of a safety patch derived in float32 and with the default mixed precision
  (float32 masters, autocast), per tensor and over all target weights.

Writes OUT.json and OUT.md. Last line: ``agreement: X kl: Y cosine: Z`` (agreement in %, KL in
nats/token, the overall patch cosine).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from safepatching.config.settings import DatasetSpec, EvalConfig, ModelLoading, PipelineConfig
from safepatching.data.sources import load_examples, load_pairs
from safepatching.evaluation.generation import HFGenerator
from safepatching.evaluation.judges.registry import Judges
from safepatching.evaluation.metrics import mean_token_kl
from safepatching.method.derive import derive_patch
from safepatching.models.loading import load_model
from safepatching.models.precision import resolve_dtype
from safepatching.storage.cache import release_memory
from safepatching.storage.files import with_extension


def decisions(model, tokenizer, batch_size: int, prompts: list[str], max_new_tokens: int, judge) -> tuple[list, float]:
    started = time.perf_counter()
    replies = HFGenerator(model, tokenizer, batch_size, progress=False).generate(prompts, max_new_tokens)
    seconds = time.perf_counter() - started
    return [judge(p, r).refusal for p, r in zip(prompts, replies, strict=True)], seconds


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=100, help="per set")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision-equivalence"))
    args = parser.parse_args()
    default_dtype = resolve_dtype(ModelLoading().compute_dtype)
    split = f"train[:{args.prompts}]"
    sets = {
        "harmful (AdvBench)": [e.prompt for e in load_examples(DatasetSpec(source="bench:advbench", split=split), args.data_dir)],
        "benign (XSTest-safe)": [e.prompt for e in load_examples(DatasetSpec(source="bench:xstest-safe", split=split), args.data_dir)],
    }  # fmt: skip
    harmless = [e.prompt for e in load_examples(DatasetSpec(source="builtin:harmless"))]
    judge = Judges(EvalConfig(), None, loading=ModelLoading())("three-way")

    reference, tokenizer = load_model(args.model, loading=ModelLoading(compute_dtype="float32"))
    model, _ = load_model(args.model, loading=ModelLoading())
    result: dict = {"model": args.model, "default_dtype": default_dtype, "sets": {}}
    agreeing = total = 0
    for name, prompts in sets.items():
        exact, exact_seconds = decisions(reference, tokenizer, 16, prompts, args.max_new_tokens, judge)
        mixed, mixed_seconds = decisions(model, tokenizer, EvalConfig().batch_size, prompts, args.max_new_tokens, judge)
        same = sum(a == b for a, b in zip(exact, mixed, strict=True))
        agreeing, total = agreeing + same, total + len(prompts)
        result["sets"][name] = {
            "prompts": len(prompts),
            "agreement_percent": 100 * same / len(prompts),
            "refusal_percent_float32": 100 * sum(exact) / len(prompts),
            f"refusal_percent_{default_dtype}": 100 * sum(mixed) / len(prompts),
            "seconds_float32_batch16": round(exact_seconds, 1),
            f"seconds_{default_dtype}_default_batch": round(mixed_seconds, 1),
        }
    result["agreement_percent"] = 100 * agreeing / total
    replies = HFGenerator(reference, tokenizer, 16, progress=False).generate(harmless, 32)
    result["kl_float32_to_default"] = mean_token_kl(model, reference, tokenizer, harmless, replies)
    del model

    del reference
    release_memory()
    config = PipelineConfig(model=args.model)
    pairs = load_pairs(config.harmful_train_specs())
    master, _ = load_model(args.model, loading=ModelLoading(), training=True)
    patches = {}
    for dtype in ("float32", default_dtype):
        patches[dtype] = derive_patch(
            master, tokenizer, pairs, "ascent", config.derive, progress=False, compute_dtype=dtype
        )
        release_memory()
    exact, mixed = patches["float32"].deltas, patches[default_dtype].deltas
    per_tensor = [cosine(exact[name], mixed[name]) for name in exact]
    overall = cosine(torch.cat([exact[n].flatten() for n in exact]), torch.cat([mixed[n].flatten() for n in exact]))
    result["patch"] = {
        "steps": {dtype: patch.info["steps"] for dtype, patch in patches.items()},
        "nll_history": {dtype: patch.info["nll_history"] for dtype, patch in patches.items()},
        "cosine_overall": overall,
        "cosine_per_tensor_median": statistics.median(per_tensor),
        "cosine_per_tensor_min": min(per_tensor),
        "tensors": len(per_tensor),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with_extension(args.out, "json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# float32 vs {default_dtype} on {args.model}",
        "",
        f"`python {shlex.join(sys.argv)}` ({torch.get_num_threads()} threads)",
        "",
        "| set | prompts | decisions agreeing (%) | refusal float32 (%) | refusal default (%) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["sets"].items():
        lines.append(
            f"| {name} | {row['prompts']} | {row['agreement_percent']:.1f} | {row['refusal_percent_float32']:.1f} "
            f"| {row[f'refusal_percent_{default_dtype}']:.1f} |"
        )
    patch = result["patch"]
    lines += [
        "",
        f"Mean per-token KL(float32 || {default_dtype}) on {len(harmless)} harmless prompts: "
        f"{result['kl_float32_to_default']:.4f} nats/token.",
        "",
        f"Safety patch derived both ways ({patch['steps']} steps): cosine {patch['cosine_overall']:.4f} over all "
        f"target weights; per tensor median {patch['cosine_per_tensor_median']:.4f}, min "
        f"{patch['cosine_per_tensor_min']:.4f} ({patch['tensors']} tensors).",
        "",
    ]
    with_extension(args.out, "md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(
        f"agreement: {result['agreement_percent']:.1f} kl: {result['kl_float32_to_default']:.4f} cosine: {overall:.4f}"
    )


if __name__ == "__main__":
    main()
