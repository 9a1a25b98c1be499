"""Validation sweep of merge settings on an existing run's patches and importance scores.

Each candidate is merged in memory and evaluated on validation prompts only (never the test split
the run reports): by default uncensorbench rows 48-99 (after the run's shuffle) as harmful
prompts and OKTest from the data directory as benign-but-scary prompts.

    python benchmarks/sweep_merge.py RUN_DIR --data-dir DIR --grid alpha=0.5,1 beta=1,2,3
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import yaml

from safepatching.config import DatasetSpec, PipelineConfig
from safepatching.data import assert_disjoint, load_examples
from safepatching.derive import load_patch
from safepatching.generation import HFGenerator
from safepatching.importance import patched
from safepatching.io import load_tensors
from safepatching.judges import get_judge
from safepatching.models import load_model
from safepatching.patching import merge_patches


def parse_grid(items: list[str]) -> list[dict[str, float]]:
    axes = {}
    for item in items:
        key, _, values = item.partition("=")
        axes[key] = [yaml.safe_load(v) for v in values.split(",")]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--grid", nargs="+", default=["alpha=0.5,1", "beta=1,2,3"])
    parser.add_argument("--harmful-split", default="train[48:72]")
    parser.add_argument("--benign-source", default="data:over_refusal/oktest/OKTest.csv")
    parser.add_argument("--benign-split", default="train[:24]")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    config = PipelineConfig.model_validate(yaml.safe_load((args.run_dir / "config.yaml").read_text()))
    train = load_examples(config.harmful_train, config.data_dir)
    harmful = load_examples(
        DatasetSpec(
            source=config.harmful_train.source, split=args.harmful_split, shuffle_seed=config.harmful_train.shuffle_seed
        ),
        args.data_dir,
    )
    benign = load_examples(
        DatasetSpec(source=args.benign_source, split=args.benign_split, shuffle_seed=0), args.data_dir
    )
    assert_disjoint(train, {"validation harmful": harmful})
    model, tokenizer = load_model(config.model, config.compute_dtype)
    safety, over = load_patch(args.run_dir / "patches/safety"), load_patch(args.run_dir / "patches/over_safety")
    scores = [load_tensors(args.run_dir / f"importance/{k}.safetensors") for k in ("safety", "over_safety")]
    judge = get_judge(config.eval.judge, args.data_dir)
    generator = HFGenerator(model, tokenizer, config.eval.batch_size, progress=False)

    def rates() -> tuple[float, float]:
        out = []
        for examples in (harmful, benign):
            responses = generator.generate([e.prompt for e in examples], args.max_new_tokens)
            out.append(
                100 * sum(judge(e.prompt, r).refusal for e, r in zip(examples, responses, strict=True)) / len(examples)
            )
        return out[0], out[1]

    rows = [{"candidate": "backbone", "harmful_refusal": None, "benign_refusal": None}]
    rows[0]["harmful_refusal"], rows[0]["benign_refusal"] = rates()
    print(json.dumps(rows[0]), flush=True)
    for candidate in parse_grid(args.grid):
        started = time.perf_counter()
        settings = config.merge.model_copy(update=candidate)
        deltas, counts = merge_patches(safety, over, settings, config.seed, *scores)
        with patched(model, deltas):
            harmful_rate, benign_rate = rates()
        row = {
            "candidate": candidate,
            "harmful_refusal": harmful_rate,
            "benign_refusal": benign_rate,
            "changed_fraction": round(counts["changed_fraction"], 4),
            "seconds": round(time.perf_counter() - started),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| candidate | harmful refusal (%) | benign refusal (%) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['candidate']} | {row['harmful_refusal']:.1f} | {row['benign_refusal']:.1f} |")


if __name__ == "__main__":
    main()
