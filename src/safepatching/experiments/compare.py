"""`safepatching eval --compare`: several models on the same sets, the first one the KL reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from safepatching import __version__
from safepatching.config.settings import PipelineConfig
from safepatching.data.eval_sets import load_eval_sets
from safepatching.evaluation.judges.registry import Judges
from safepatching.evaluation.suite import check_evaluation, check_expert, evaluate_model, harmless_responses
from safepatching.models.loading import check_model_source, load_model
from safepatching.models.precision import resolved
from safepatching.report.results import SUMMARY_SCHEMA_VERSION, save_eval
from safepatching.report.statistics import compare_outcomes
from safepatching.report.tables import comparison_markdown, statistics_markdown
from safepatching.storage.cache import stage_meter
from safepatching.storage.files import write_json, write_text_atomic

HARMFUL_SETS = ("harmful", "safety/", "jailbreak/")  # judged by harmful responses; the rest by refusals


def compare_models(
    models: list[str], config: PipelineConfig, out_dir: Path, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Evaluate several models on the same sets; the first is the reference for KL. Not cached: a model
    named by its folder may have been rewritten since."""
    for spec in dict.fromkeys(models):  # a bad name fails here, not after the models before it are evaluated
        check_model_source(spec)
    loading = resolved(config.loading)  # one dtype for every model compared
    judges = Judges(config.eval, config.data_dir, loading=loading)  # a model judge is loaded once for all
    check_evaluation(config.eval, judges)
    check_expert(config.eval.decoding)
    sets = load_eval_sets(config.eval, config.data_dir)
    reference, tokenizer = load_model(models[0], loading=loading)
    results: dict[str, Any] = {}
    reference_records: list[dict[str, Any]] = []
    all_records: dict[str, list[dict[str, Any]]] = {}
    for index, spec in enumerate(models):
        label = f"{index}-{Path(spec).name or spec}"
        stages: dict[str, Any] = {}
        with stage_meter(stages, "eval"):
            model = reference if index == 0 else load_model(spec, loading=loading)[0]
            metrics, records = evaluate_model(
                model,
                tokenizer,
                sets,
                config.eval,
                reference=None if index == 0 else reference,
                reference_harmless=None if index == 0 else harmless_responses(reference_records),
                label=label,
                progress=progress,
                data_dir=config.data_dir,
                model_source=spec,
                loading=loading,
                judges=judges,
            )
            del model
        if index == 0:
            reference_records = records
        save_eval(out_dir / label, metrics, records)
        all_records[spec] = records
        results[spec] = {**metrics, "peak_rss_gib": stages["eval"]["peak_rss_gib"]}
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "safepatching": __version__,
        "command": command,
        "reference": models[0],
        "eval": config.eval.model_dump(mode="json"),
        "models": results,
        "statistics": compare_outcomes(all_records, HARMFUL_SETS),
    }
    write_json(out_dir / "summary.json", summary)
    header = f"command: `{command or '(Python API)'}`\n\n"
    write_text_atomic(
        out_dir / "summary.md",
        header + comparison_markdown(results) + "\n" + statistics_markdown(summary["statistics"]),
    )
    Console(highlight=False).print(comparison_markdown(results))
    return summary
