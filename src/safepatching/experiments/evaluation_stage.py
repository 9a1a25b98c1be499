"""The evaluation stage: the backbone and the patched model on the same sets, each cached apart, so
a new merge re-evaluates only the patched model. KL is taken on the backbone's own replies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safepatching.data.eval_sets import EvalSets
from safepatching.evaluation.suite import evaluate_model, harmless_responses
from safepatching.experiments.stages import Stages
from safepatching.models.loading import load_model
from safepatching.report.results import read_jsonl, save_eval
from safepatching.storage.cache import cached
from safepatching.storage.files import read_json


def saved_eval(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return read_json(directory / "metrics.json"), read_jsonl(directory / "records.jsonl")


def evaluate_before_after(stages: Stages, sets: EvalSets, model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backbone metrics, patched metrics) on ``sets``, written under eval/backbone and eval/patched."""
    eval_dir, config = stages.out / "eval", stages.config
    model, tokenizer = stages.backbone.model()
    common = {
        "progress": stages.progress, "data_dir": config.data_dir, "loading": stages.loading, "judges": stages.judges
    }  # one judge for both evaluations

    def backbone_eval():
        metrics, records = evaluate_model(
            model, tokenizer, sets, config.eval, label="backbone", model_source=config.model, **common
        )
        save_eval(eval_dir / "backbone", metrics, records)
        return metrics, records

    before, records = cached(
        eval_dir / "backbone", stages.keys.backbone_eval(), backbone_eval, lambda: saved_eval(eval_dir / "backbone"),
        stages.meter, "eval_backbone",
    )  # fmt: skip

    def patched_eval():
        patched_model, _ = load_model(str(model_dir), loading=stages.loading)
        metrics, patched_records = evaluate_model(
            patched_model,
            tokenizer,
            sets,
            config.eval,
            reference=model,
            reference_harmless=harmless_responses(records),
            label="patched",
            model_source=str(model_dir),
            **common,
        )
        save_eval(eval_dir / "patched", metrics, patched_records)
        return metrics

    after = cached(
        eval_dir / "patched", stages.keys.patched_eval(), patched_eval, lambda: saved_eval(eval_dir / "patched")[0],
        stages.meter, "eval_patched",
    )  # fmt: skip
    return before, after
