"""The whole SafePatching run: derive, score, merge, evaluate (each a cached stage), then a summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from safepatching import __version__
from safepatching.config.loading import dump_config
from safepatching.config.settings import PipelineConfig
from safepatching.experiments.stages import Stages
from safepatching.report.results import SUMMARY_SCHEMA_VERSION
from safepatching.report.tables import before_after_markdown, print_before_after
from safepatching.storage.files import write_json, write_text_atomic

PATCH_SUMMARY_KEYS = ("steps", "stop_reason", "nll_history")


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    summary: dict[str, Any]
    stages: dict[str, Any] = field(default_factory=dict)


def run_stages(stages: Stages) -> RunResult:
    """Every stage of ``stages.config`` in order, then summary.json / summary.md and a table."""
    config, out = stages.config, stages.out
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_config(config))
    pairs = stages.harmful_pairs()
    sets = stages.eval_sets(pairs)
    safety, over_safety = stages.derive(pairs)
    scores = stages.importance(pairs, safety, over_safety)
    stages.backbone()  # training is over: the one backbone copy drops to the compute dtype before the merge
    model_dir = out / "model"
    stages.merge(safety, over_safety, scores, model_dir)
    before, after = stages.evaluate(sets, model_dir)
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "safepatching": __version__,
        "model": config.model,
        "compute_dtype": stages.compute_dtype,
        "patched_model": str(model_dir),
        "backbone": before,
        "patched": after,
        "patches": {
            "safety": {k: safety.info[k] for k in PATCH_SUMMARY_KEYS},
            "over_safety": {k: over_safety.info[k] for k in PATCH_SUMMARY_KEYS},
        },
        "stages": stages.meter,
    }
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", before_after_markdown(before, after))
    print_before_after(before, after, model_dir, Console())
    return RunResult(out, model_dir, summary, stages.meter)


def run_pipeline(config: PipelineConfig, progress: bool = True) -> RunResult:
    """Run SafePatching end to end for ``config`` and return where everything was written."""
    return run_stages(Stages(config, progress))
