"""Peak memory of SNIP importance scoring: ours (each gradient folded into its score and freed as
soon as backward finishes it) against the textbook loop (backward, then fold every gradient).

Each runs in a fresh process on the same model, pairs and settings (the pipeline's importance
defaults, float32 masters, the default compute dtype), so each peak resident set size is its own.
Both must give the same scores (checked on every tensor's sum).

Last line: ``ratio: X`` with X = the textbook loop's peak RSS / ours.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

GIB = 1 << 30


def textbook_scores(model, tokenizer, pairs, names, settings, compute_dtype) -> dict[str, torch.Tensor]:
    """The peer: every target gradient of a batch exists at once before it is folded."""
    from safepatching.method.derive import make_loader
    from safepatching.method.objectives import autocast, response_nll
    from safepatching.models.precision import DTYPES

    loader = make_loader(tokenizer, pairs[: settings.max_examples], settings.max_length, settings.batch_size, seed=0,
                         shuffle=False)  # fmt: skip
    params, selected = dict(model.named_parameters()), set(names)
    for name, param in params.items():
        param.requires_grad_(name in selected)
    scores = {name: torch.zeros_like(params[name]) for name in names}
    model.eval()
    for batch in loader:
        with autocast(model, DTYPES[compute_dtype]):
            loss = response_nll(model, batch)
        loss.backward()
        with torch.no_grad():
            for name in names:
                scores[name].add_((params[name].detach() * params[name].grad).abs())
                params[name].grad = None
    return {name: score.div_(len(loader)) for name, score in scores.items()}


def measure(model_name: str, variant: str) -> dict:
    """One variant in this process: peak RSS after loading, after scoring, and each score's sum."""
    from safepatching.config.settings import ModelLoading, PipelineConfig
    from safepatching.data.sources import load_pairs
    from safepatching.method.derive import target_parameter_names
    from safepatching.method.importance import snip_scores
    from safepatching.models.loading import load_model
    from safepatching.models.precision import resolve_dtype

    config = PipelineConfig(model=model_name)
    pairs = load_pairs(config.harmful_train_specs())
    model, tokenizer = load_model(model_name, loading=ModelLoading(), training=True)
    names = target_parameter_names(model, config.derive.target_modules)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype = resolve_dtype(ModelLoading().compute_dtype)
    if variant == "ours":
        scores = snip_scores(model, tokenizer, pairs, names, config.importance, progress=False, compute_dtype=dtype)
    else:
        scores = textbook_scores(model, tokenizer, pairs, names, config.importance, dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    selected = set(names)
    target = sum(param.numel() for name, param in model.named_parameters() if name in selected)
    return {
        "loaded": loaded,
        "peak": peak,
        "target_params": target,
        "sums": {name: float(score.double().sum()) for name, score in scores.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--variant", choices=["ours", "textbook"], help=argparse.SUPPRESS)  # a child's own run
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.model, args.variant)))
        return
    results = {}
    for variant in ("ours", "textbook"):
        command = [sys.executable, __file__, "--model", args.model, "--variant", variant]
        results[variant] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    ours, textbook = results["ours"], results["textbook"]
    worst = max(
        abs(ours["sums"][n] - textbook["sums"][n]) / max(abs(textbook["sums"][n]), 1e-30) for n in textbook["sums"]
    )
    print(
        f"model: {args.model}; {len(ours['sums'])} target tensors, {ours['target_params'] / 1e6:.0f} M weights; "
        f"threads: {torch.get_num_threads()}"
    )
    for label, result in (("ours (gradients folded as backward finishes them)", ours), ("textbook loop", textbook)):
        print(f"{label}: peak RSS {result['peak'] / GIB:.2f} GiB (model loaded: {result['loaded'] / GIB:.2f} GiB)")
    print(f"largest relative difference of a score tensor's sum: {worst:.1e}")
    print(f"ratio: {textbook['peak'] / ours['peak']:.2f}")


if __name__ == "__main__":
    main()
