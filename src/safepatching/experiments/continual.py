"""`safepatching continual`: post safety alignment round after round on new harmful data.

Each method starts from the backbone; in round r it derives its patches on round r's pairs from the
model that rounds 1..r-1 produced, merges them in (SafePatching: the controllable merge; GA and NPO:
the unlearning patch times merge.alpha, 1 unless the method's own settings say otherwise), and the result is evaluated against the original backbone.
Derived patches, importance scores and evaluations are cached per round under ``work_dir``, keyed
by everything that produced the weights they start from, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from safepatching import __version__
from safepatching.config.experiments import ContinualConfig
from safepatching.config.identity import cache_identity
from safepatching.data.eval_sets import EvalSets, load_eval_sets
from safepatching.data.overlap import assert_disjoint, drop_overlap
from safepatching.data.sources import Example, load_examples
from safepatching.evaluation.judges.registry import Judges
from safepatching.evaluation.metrics import reference_logprobs
from safepatching.evaluation.suite import check_evaluation, evaluate_model, harmless_responses
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.compare import HARMFUL_SETS
from safepatching.experiments.stages import Stages
from safepatching.method.dense import add_deltas
from safepatching.method.merger import PatchMerger
from safepatching.models.loading import load_model
from safepatching.models.precision import DTYPES, cast_weights, resolved
from safepatching.report.plots import plot_rounds
from safepatching.report.results import read_jsonl, result_header, save_eval
from safepatching.report.statistics import continual_outcomes
from safepatching.report.tables import continual_markdown, table_columns
from safepatching.storage.cache import cached, fingerprint
from safepatching.storage.files import read_json, write_json, write_text_atomic
from safepatching.storage.lock import directory_lock

CONTINUAL_SCHEMA_VERSION = 2  # 2: paired statistics per set, method and round


def load_rounds(config: ContinualConfig, sets: EvalSets) -> list[list[Example]]:
    """Each round's pairs; refused when a round shares a prompt with another round or an eval set
    (unless pipeline.drop_eval_overlap, which drops the eval set's prompts from the round)."""
    data_dir = config.pipeline.data_dir
    rounds = [load_examples(spec, data_dir) for spec in config.rounds]
    if config.pipeline.drop_eval_overlap:
        rounds = [drop_overlap(pairs, sets.named()) for pairs in rounds]
    for index, pairs in enumerate(rounds):
        others = {f"round {j + 1}": other for j, other in enumerate(rounds) if j != index}
        assert_disjoint(pairs, {**sets.named(), **others})
    return rounds


def round_deltas(run: Stages, method: str, pairs: list[Example]) -> dict[str, torch.Tensor]:
    """What one round adds to the model for ``method``."""
    if method in ("ga", "npo"):
        label, derivation = ("safety", "ascent") if method == "ga" else ("npo", "npo")
        patch = run.patches.derive_one(pairs, label, derivation)
        scale = run.config.merge.alpha
        return {name: delta * scale if scale != 1 else delta for name, delta in patch.deltas.items()}
    safety, over_safety = run.patches.derive(pairs)
    scores = run.patches.importance(pairs, safety, over_safety)
    deltas, _ = PatchMerger(safety, over_safety, run.config.merge, run.config.seed, *scores).merge_all()
    return deltas


class Continual:
    def __init__(self, config: ContinualConfig, progress: bool = True):
        self.config, self.progress = config, progress
        pipeline = config.pipeline
        self.sets = load_eval_sets(pipeline.eval, pipeline.data_dir)
        self.rounds = load_rounds(config, self.sets)
        self.loading = resolved(pipeline.loading)
        self.judges = Judges(pipeline.eval, pipeline.data_dir, loading=self.loading)  # one for every round
        check_evaluation(pipeline.eval, self.judges)
        self.work = Path(config.work_dir)
        self.tokenizer = None
        self.reference: list[torch.Tensor] | None = None  # the backbone's log-probabilities for KL

    def evaluate(self, directory: Path, model, state: str, reference_harmless: list[str] | None) -> dict[str, Any]:
        """Evaluate ``model`` (whose weights ``state`` names) in the compute dtype, or read the saved
        result. A float32 working model is evaluated through a copy in the compute dtype."""
        pipeline = self.config.pipeline
        key = fingerprint(state, cache_identity(pipeline.eval), pipeline.data_dir, __version__)
        return cached(
            directory,
            key,
            lambda: self.evaluate_now(directory, model, reference_harmless),
            lambda: read_json(directory / "metrics.json"),
        )

    def evaluate_now(self, directory: Path, model, reference_harmless: list[str] | None) -> dict[str, Any]:
        pipeline = self.config.pipeline
        dtype = DTYPES[self.loading.compute_dtype]
        if next(model.parameters()).dtype != dtype:
            model = cast_weights(copy.deepcopy(model), dtype)
        metrics, records = evaluate_model(
            model,
            self.tokenizer,
            self.sets,
            pipeline.eval,
            reference=self.reference,
            reference_harmless=reference_harmless,
            label=directory.name,
            progress=self.progress,
            data_dir=pipeline.data_dir,
            loading=self.loading,
            judges=self.judges,
        )
        save_eval(directory, metrics, records)
        return metrics

    def run(self, command: str) -> dict[str, Any]:
        started = time.perf_counter()
        origin = fingerprint(self.config.pipeline.model, self.loading.compute_dtype)
        backbone, self.tokenizer = load_model(self.config.pipeline.model, loading=self.loading)
        baseline = self.evaluate(self.work / "round-0", backbone, origin, None)
        baseline_records = read_jsonl(self.work / "round-0" / "records.jsonl")
        reference_harmless = harmless_responses(baseline_records)
        prompts = [e.prompt for e in self.sets.harmless]
        self.reference = reference_logprobs(backbone, self.tokenizer, prompts, reference_harmless)
        del backbone  # its log-probabilities on the harmless replies are all that KL needs from it
        rows: dict[str, list[dict[str, Any]]] = {}
        records: dict[str, list[list[dict[str, Any]]]] = {}  # per prompt, for the paired statistics
        for method in self.config.methods:
            pipeline = self.config.method_pipeline(method)
            host = Backbone(pipeline.model, self.loading, pipeline.derive.target_modules).master_host()
            working, _ = host.model(training=True)  # the float32 master the rounds add up in
            state = origin
            rows[method], records[method] = [baseline], [baseline_records]
            for number, (spec, pairs) in enumerate(zip(self.config.rounds, self.rounds, strict=True), start=1):
                directory = self.work / method / f"round-{number}"
                settings = pipeline.model_copy(update={"harmful_train": spec, "output_dir": directory})
                # the rounds only derive and merge: their evaluation is ours, its settings checked at the start
                run = Stages(settings, self.progress, backbone=host, base_state=state, evaluates=False)
                add_deltas(working, round_deltas(run, method, pairs))
                state = fingerprint(state, method, run.keys.merge())
                rows[method].append(self.evaluate(directory / "eval", working, state, reference_harmless))
                records[method].append(read_jsonl(directory / "eval" / "records.jsonl"))
                partial = continual_result(self.config, command, rows, records, started, complete=False)
                write_continual_results(self.config, partial)
            del working, host
        result = continual_result(self.config, command, rows, records, started, complete=True)
        write_continual_results(self.config, result)
        Console(highlight=False).print(continual_markdown(result))
        return result


def continual_result(
    config: ContinualConfig,
    command: str,
    rows: dict[str, list[dict[str, Any]]],
    records: dict[str, list[list[dict[str, Any]]]],
    started: float,
    complete: bool,
) -> dict[str, Any]:
    return {
        **result_header(config, command, time.perf_counter() - started, complete, CONTINUAL_SCHEMA_VERSION),
        "methods": {
            method: [
                {
                    "round": number,
                    "columns": table_columns(metrics, config.harmful_label, config.benign_label),
                    "harmful_response_rate_by_category": metrics.get("harmful_response_rate_by_category", {}),
                }
                for number, metrics in enumerate(per_round)
            ]
            for method, per_round in rows.items()
        },
        "statistics": continual_outcomes(records, HARMFUL_SETS),
        "config": config.model_dump(mode="json"),
    }


def write_continual_results(config: ContinualConfig, result: dict[str, Any]) -> None:
    base = Path(config.output_dir)
    write_json(base / f"{config.name}.json", result)
    write_text_atomic(base / f"{config.name}.md", continual_markdown(result))
    plot_rounds(result, base / f"{config.name}.png")


def run_continual(config: ContinualConfig, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run every method's rounds and write OUTPUT_DIR/<name>.md, .json and .png."""
    continual = Continual(config, progress)
    with directory_lock(config.work_dir, command):
        return continual.run(command)
