"""`safepatching bench`: SafePatching against unlearning, merging and decoding-time baselines.

The patches (ascent, descent and, when asked for, NPO) and the importance scores are derived once
with the pipeline's cached stages. Every method is then a merge of those patches applied in memory
to a copy of the backbone (or a decoding rule on the backbone), evaluated with the evaluation suite
for every seed its result depends on. Each finished cell is saved under ``work_dir/cells``, so a
rerun after a crash resumes where it stopped. Results: ``OUTPUT_DIR/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import copy
import statistics
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from safepatching import __version__
from safepatching.config.experiments import BenchConfig, BenchMethod
from safepatching.config.identity import cache_identity
from safepatching.config.settings import PipelineConfig
from safepatching.data.eval_sets import EvalSets
from safepatching.data.sources import Example, load_examples
from safepatching.evaluation.decoding import make_generator
from safepatching.evaluation.suite import check_expert, evaluate_model, harmless_responses
from safepatching.experiments.compare import HARMFUL_SETS
from safepatching.experiments.directional import DirectionalEdits
from safepatching.experiments.stages import Stages
from safepatching.experiments.tune import candidate_settings, finished_count, make_scorer, run_tune, validation_sets
from safepatching.experiments.validation import ValidationScorer
from safepatching.method.dense import DensePatch, patched
from safepatching.method.directions import edit_counts
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.method.merger import PatchMerger
from safepatching.models.loading import load_model
from safepatching.report.plots import plot_bench_fronts
from safepatching.report.results import read_jsonl, result_header, save_eval
from safepatching.report.statistics import compare_outcomes
from safepatching.report.tables import bench_markdown, table_columns
from safepatching.storage.cache import cached, fingerprint
from safepatching.storage.files import read_json, write_json, write_text_atomic
from safepatching.storage.lock import directory_lock

BENCH_SCHEMA_VERSION = 1
NOT_MEASURED = None  # a cell a method has no value for (e.g. KL of a decoding rule)


def depends_on_seed(config: BenchConfig, name: str, chosen: PipelineConfig | None = None) -> bool:
    """Only random retention draws from the seed; derivation is shared by all rows. ``chosen``: the
    tuned row's chosen point."""
    method = config.method(name)
    if method.kind != "merge":
        return False
    settings = chosen.merge if chosen else config.merge_settings(method)
    return settings.retention < 1.0 and MERGE_METHODS[settings.method].uses_retention


def study_summary(result: dict[str, Any], results: str) -> dict[str, Any]:
    """What a tuned row's table keeps of its study: budget, time, the screened front and the chosen
    point with its full-budget validation rates."""
    chosen = result["chosen"]
    final = next((p["final"] for p in result["front"] if chosen and p["trial"] == chosen["trial"]), None)
    return {
        "trials": finished_count(result),
        "seconds": result["wall_seconds"],
        "results": results,
        "backbone": {group: result["backbone"]["final"][group] for group in ("harmful", "benign")},
        "screened_front": [
            {"trial": p["trial"], "harmful": p["screen"]["harmful"], "benign": p["screen"]["benign"]}
            for p in result["screened_front"]
        ],
        "chosen": chosen
        and {
            "trial": chosen["trial"],
            "params": chosen["params"],
            "validation": {group: final[group] for group in ("harmful", "benign")} | {"kl": final["kl"]},
        },
    }


def chosen_identity_exclusions(point: PipelineConfig) -> set[str]:
    """What a tuned row's chosen point leaves out of its cell key: where output goes, and the
    directional section while it is off (points chosen before it existed keep their keys)."""
    return {"output_dir", "data_dir", *(() if point.directional.active else ("directional",))}


def summarise(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (sd is None for a single value)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "sd": None, "n": 0, "values": values}
    sd = statistics.stdev(present) if len(present) > 1 else None
    return {"mean": statistics.fmean(present), "sd": sd, "n": len(present), "values": values}


@dataclass
class SharedPatches:
    """What a bench derives once for all its merge rows, by patch kind (ascent, descent, npo,
    benign): the patches, the importance scores of each over-safety kind's pairing with ascent, and
    the wall time of each (importance under ``importance/<over-safety kind>``)."""

    patches: dict[str, DensePatch] = field(default_factory=dict)
    scores: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def kinds(method: BenchMethod) -> tuple[str, str]:
        """The kinds of the safety and over-safety patches a merge row merges."""
        return ("npo" if method.safety_patch == "npo" else "ascent",
                "benign" if method.over_safety_patch == "benign" else "descent")  # fmt: skip

    def for_row(self, method: BenchMethod, needs_importance: bool) -> tuple[DensePatch, DensePatch, tuple[Any, Any]]:
        """The safety patch, over-safety patch and importance scores a merge row merges."""
        safety, over_safety = self.kinds(method)
        scores = self.scores.get(over_safety, (None, None)) if needs_importance else (None, None)
        return self.patches[safety], self.patches[over_safety], scores

    def seconds(self, method: BenchMethod, over_safety_merged: bool, needs_importance: bool) -> float:
        """Wall time of deriving the patches (and scores) the row merges, from the stage records."""
        safety, over_safety = self.kinds(method)
        used = [safety]
        if over_safety_merged:
            used.append(over_safety)
        if needs_importance:
            used.append(f"importance/{over_safety}")
        return sum(self.timings.get(kind, 0.0) for kind in used)


@dataclass
class Bench:
    """The shared state of one bench run: backbone, patches, scores and the evaluation sets."""

    config: BenchConfig
    progress: bool = True
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # which invocation timed a cell

    def __post_init__(self) -> None:
        pipeline = self.config.pipeline.model_copy(update={"output_dir": self.config.work_dir})
        self.stages = Stages(pipeline, self.progress, self.console)
        for name in self.config.methods:  # an expert named by folder or hub id, not by a bench method
            method = self.config.method(name)
            if method.kind == "decoding" and self.config.expert_method(method) is None:
                check_expert(self.config.decoding_settings(method))
        self.pairs: list[Example] = self.stages.harmful_pairs()
        self.sets: EvalSets = self.stages.data.eval_sets(self.pairs)  # refuses overlap with the training pairs
        self.shared = SharedPatches()
        self.chosen: dict[str, PipelineConfig] = {}  # tuned rows: the point each study chose
        self.tuning: dict[str, dict[str, Any]] = {}  # tuned rows: what their study found
        self._scorer: ValidationScorer | None = None
        self._working = None
        self._reference_harmless: list[str] | None = None
        held_out = self.sets.named()  # the studies' validation prompts too, so both use the same directions
        if self.config.tuning:
            validation = self.config.tuning.validation
            held_out |= {s.name: s.examples for s in validation_sets(validation, pipeline.data_dir)}
            if validation.harmless:
                held_out["harmless"] = load_examples(validation.harmless, pipeline.data_dir)
        self.edits = DirectionalEdits(
            pipeline, self.stages.judges, self.config.work_dir / "directions", held_out, progress=self.progress
        )

    # -- derived once --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Derive the patches and scores the selected methods need (cached in work_dir)."""
        tuned = self.config.tuning.spaces if self.config.tuning else {}
        methods = [self.config.method(name) for name in self.config.methods if name not in tuned]
        merges = [m for m in methods if m.kind == "merge"] + [e for m in methods if (e := self.config.expert_method(m))]
        merges = [m for m in merges if self.config.merge_settings(m).merges_patches]  # edit-only rows derive nothing
        if not merges:
            return
        # each time is read beside its derivation: a stale stage an earlier bench left in work_dir is not counted
        patches, scores, timings = self.shared.patches, self.shared.scores, self.shared.timings
        main = self.stages.patches
        patches["ascent"], patches["descent"] = main.derive(self.pairs)
        timings["ascent"] = main.stage_seconds("patches/safety")
        timings["descent"] = main.stage_seconds("patches/over_safety")
        if any(m.safety_patch == "npo" for m in merges):
            patches["npo"] = main.derive_one(self.pairs, "npo", "npo")
            timings["npo"] = main.stage_seconds("patches/npo")
        needs_importance = [m for m in merges if MERGE_METHODS[self.config.merge_settings(m).method].needs_importance]
        if needs_importance:
            scores["descent"] = main.importance(self.pairs, patches["ascent"], patches["descent"])
            timings["importance/descent"] = main.stage_seconds("importance")
        if any(m.over_safety_patch == "benign" for m in merges):
            benign = self.benign_stages
            benign.data.eval_sets(self.pairs)  # its prompts must not be evaluated on either
            patches["benign"] = benign.patches.derive_over_safety(self.pairs)
            timings["benign"] = benign.patches.stage_seconds("patches/over_safety")
            if any(m.over_safety_patch == "benign" for m in needs_importance):
                scores["benign"] = benign.patches.importance(self.pairs, patches["ascent"], patches["benign"])
                timings["importance/benign"] = benign.patches.stage_seconds("importance")

    @cached_property
    def benign_stages(self) -> Stages:
        """The stages of the *-benign-os rows: the pipeline with the bench's over-safety section, in
        work_dir/benign-os (the safety patch is the same and is derived once, in work_dir)."""
        pipeline = self.config.pipeline.model_copy(
            update={
                "over_safety": self.config.over_safety,
                "output_dir": self.config.work_dir / "benign-os",
            }
        )
        return Stages(pipeline, self.progress, self.console, evaluates=False)  # derives only; cells use self.stages

    def derive_seconds(self, method: BenchMethod) -> float:
        """Derivation (and importance) wall time the method's patches took, from the stage records."""
        if method.kind == "decoding":
            expert = self.config.expert_method(method)
            return self.derive_seconds(expert) if expert else 0.0
        if method.kind == "backbone":
            return 0.0
        settings = self.config.merge_settings(method)
        row = self.config.row_pipeline(method)
        seconds = self.edits.seconds(row) if row.directional.active else 0.0
        if not settings.merges_patches:
            return seconds
        needs_importance = MERGE_METHODS[settings.method].needs_importance
        return seconds + self.shared.seconds(method, settings.beta != 0, needs_importance)

    # -- tuning --------------------------------------------------------------------------------------
    def tune(self, name: str, command: str) -> None:
        """Search the row's family on the validation sets (its study resumes from work_dir) and keep the
        point its rule chose; a row with no feasible trial keeps its configured point."""
        config = self.config.tune_config(name)
        if self._scorer is None:
            self._scorer = make_scorer(config, self.progress)
        result = run_tune(config, command, progress=self.progress, scorer=self._scorer)
        chosen = result["chosen"]
        self.tuning[name] = study_summary(result, str(config.output_dir / config.name))
        if chosen:
            self.chosen[name] = candidate_settings(config, self._scorer.config, chosen["params"])

    def candidate_deltas(self, name: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A tuned merge row's deltas at its chosen point, from the patches its study derived."""
        candidate = self.chosen[name]
        edits = self.edit_deltas(candidate)
        if not candidate.merge.merges_patches:
            return edits, edit_counts(edits)
        safety, over_safety, scores = self._scorer.derived(candidate)
        return PatchMerger(safety, over_safety, candidate.merge, seed, *scores, edits=edits).merge_all()

    def edit_deltas(self, settings: PipelineConfig) -> dict[str, torch.Tensor]:
        """The directional edits ``settings`` ask for (directions of the untouched backbone)."""
        model, tokenizer = self.stages.backbone.model()
        return self.edits.deltas(settings, model, tokenizer, self.stages.backbone.base_weight)

    # -- cells ---------------------------------------------------------------------------------------
    def working(self):
        """A second copy of the backbone that merges are applied to (the first stays the KL reference).
        A study's scorer already holds one in the compute dtype, restored after each of its merges: it
        is reused, since a third copy of a 1.5B backbone in float32 (6 GB) would not fit 24 GiB."""
        if self._working is None:
            scorer = self._scorer
            self._working = scorer.model if scorer and scorer.loaded else copy.deepcopy(self.stages.backbone.model()[0])
        return self._working

    def merged_deltas(self, name: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
        started = time.perf_counter()
        if name in self.chosen:
            deltas, counts = self.candidate_deltas(name, seed)
            return deltas, counts, time.perf_counter() - started
        method = self.config.method(name)
        settings = self.config.merge_settings(method)
        edits = self.edit_deltas(self.config.row_pipeline(method))
        if not settings.merges_patches:
            return edits, edit_counts(edits), time.perf_counter() - started
        safety, over_safety, scores = self.shared.for_row(method, MERGE_METHODS[settings.method].needs_importance)
        deltas, counts = PatchMerger(safety, over_safety, settings, seed, *scores, edits=edits).merge_all()
        return deltas, counts, time.perf_counter() - started

    def cell(self, name: str, seed: int) -> dict[str, Any]:
        """Metrics of one method at one seed, read from work_dir when already evaluated."""
        method = self.config.method(name)
        directory = self.config.work_dir / "cells" / name / f"seed-{seed}"
        eval_settings = self.config.pipeline.eval
        merged = self.config.merged_method(method)
        stages = self.benign_stages if method.over_safety_patch == "benign" else self.stages
        chosen = [self.chosen[n] for n in (name, method.decoding.expert_model) if n in self.chosen]  # tuned shapes
        key = fingerprint(
            stages.keys.importance(),
            method,
            seed,
            cache_identity(eval_settings),
            self.config.pipeline.data_dir,
            __version__,
            *([cache_identity(self.config.merge_settings(merged))] if merged else []),
            *([cache_identity(edit.directional)] if merged and (edit := self.config.row_pipeline(merged)).directional.active else []),
            *[point.model_dump(mode="json", exclude=chosen_identity_exclusions(point)) for point in chosen],
        )
        return cached(
            directory,
            key,
            lambda: self.evaluate_cell(name, seed, directory),
            lambda: read_json(directory / "metrics.json"),
            extra=lambda _: {"method": name, "seed": seed},
        )

    def evaluate_cell(self, name: str, seed: int, directory: Path) -> dict[str, Any]:
        method = self.config.method(name)
        model, tokenizer = self.stages.backbone.model()
        eval_settings = self.config.pipeline.eval
        extra: dict[str, Any] = {"merge_seconds": 0.0}
        common = {
            "label": f"{directory.parent.name} seed {seed}",
            "progress": self.progress,
            "data_dir": self.config.pipeline.data_dir,
            "loading": self.stages.loading,
            "judges": self.stages.judges,
        }
        if method.kind == "backbone":
            metrics, records = evaluate_model(model, tokenizer, self.sets, eval_settings, **common)
        elif method.kind == "merge":
            deltas, counts, seconds = self.merged_deltas(name, seed)
            extra.update(merge_seconds=round(seconds, 2), merge_counts=counts)
            with patched(self.working(), deltas, self.stages.backbone.base_weight):
                metrics, records = evaluate_model(
                    self.working(),
                    tokenizer,
                    self.sets,
                    eval_settings,
                    reference=model,
                    reference_harmless=self.reference_harmless(),
                    **common,
                )
        else:
            metrics, records = self.decoding_cell(name, seed, common)
        derive_seconds = 0.0 if name in self.chosen else self.derive_seconds(method)  # a study's time is its own
        metrics = {**metrics, **extra, "derive_seconds": derive_seconds, "timed_in": self.run_id}
        save_eval(directory, metrics, records)
        return metrics

    def decoding_cell(self, name: str, seed: int, common: dict[str, Any]):
        """A decoding rule on the backbone. Utility and KL score weights, not a decoding rule, so
        they are not measured here (they would only repeat the backbone's). SafeDecoding's expert is
        the merged model of the bench method its ``expert_model`` names (ga by default) or a folder."""
        method = self.config.method(name)
        model, tokenizer = self.stages.backbone.model()
        eval_config = self.config.pipeline.eval
        decoding = self.chosen[name].eval.decoding if name in self.chosen else self.config.decoding_settings(method)
        utility_off = eval_config.utility.model_copy(update={"mmlu_examples": 0, "gsm8k_examples": 0})
        eval_settings = eval_config.model_copy(update={"utility": utility_off, "perplexity": None})
        expert_deltas: dict[str, torch.Tensor] = {}
        expert = None
        if decoding.method == "safedecoding":
            expert_method = self.config.expert_method(method)
            if expert_method is not None:
                expert_deltas, _, _ = self.merged_deltas(decoding.expert_model, seed)
                expert = self.working()
            else:
                expert, _ = load_model(decoding.expert_model, loading=self.stages.loading)
        with patched(self.working(), expert_deltas, self.stages.backbone.base_weight):
            generator = make_generator(
                model, tokenizer, decoding, eval_settings.batch_size, self.progress, common["label"], expert
            )
            return evaluate_model(model, tokenizer, self.sets, eval_settings, generator=generator, **common)

    def reference_harmless(self) -> list[str]:
        """The backbone's own replies to the harmless prompts, the text KL is measured on."""
        if self._reference_harmless is None:
            self.cell("backbone", self.config.seeds[0])
            directory = self.config.work_dir / "cells" / "backbone" / f"seed-{self.config.seeds[0]}"
            records = read_jsonl(directory / "records.jsonl")
            self._reference_harmless = harmless_responses(records)
        return self._reference_harmless


def run_bench(config: BenchConfig, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Tune the rows ``tuning`` names, then run every selected method for its seeds; write
    OUTPUT_DIR/<name>.md and .json (and, when tuned, <name>.png with the fronts and test points)."""
    started = time.perf_counter()
    bench = Bench(config, progress)
    with directory_lock(config.work_dir, command):  # after the settings are checked
        bench.prepare()
        for name in config.methods:  # every study first: a SafeDecoding row's expert may be a tuned row
            if config.tuning and name in config.tuning.spaces:
                bench.tune(name, command)
        backbone_metrics = bench.cell("backbone", config.seeds[0])
        rows: dict[str, Any] = {}
        cell_seconds = {("backbone", config.seeds[0]): evaluation_seconds(backbone_metrics)}
        tuning_seconds = sum(t["seconds"] for t in bench.tuning.values())
        for name in config.methods:
            seeds = config.seeds if depends_on_seed(config, name, bench.chosen.get(name)) else config.seeds[:1]
            cells = [bench.cell(name, seed) for seed in seeds]
            cell_seconds.update({(name, seed): evaluation_seconds(cell) for seed, cell in zip(seeds, cells, strict=True)})
            rows[name] = method_row(config, name, seeds, cells, backbone_metrics)
            if name in bench.tuning:
                rows[name]["tuning"] = bench.tuning[name]
            compute = sum(bench.shared.timings.values()) + bench.edits.computed_seconds() + sum(cell_seconds.values())
            compute += tuning_seconds
            result = bench_result(config, command, rows, time.perf_counter() - started, compute, complete=False)
            write_bench_results(config, result)  # after every method: a crash keeps what is done
        result = bench_result(config, command, rows, time.perf_counter() - started, compute, complete=True)
        write_bench_results(config, result)
        Console(highlight=False).print(bench_markdown(result))
        return result


def paired_statistics(config: BenchConfig, methods: list[str]) -> list[dict[str, Any]]:
    """Every set's rate per row (first seed) with its Wilson interval, and McNemar's p against the
    backbone and against SafePatching on the same prompts."""
    first = [name for name in ("backbone", "safepatching") if name in methods]
    order = first + [name for name in methods if name not in first]
    records = {
        name: read_jsonl(config.work_dir / "cells" / name / f"seed-{config.seeds[0]}" / "records.jsonl")
        for name in order
    }
    return compare_outcomes(records, HARMFUL_SETS) if order[0] == "backbone" else []


def evaluation_seconds(metrics: dict[str, Any]) -> float:
    """Wall time one cell took when it was computed (its merge and every evaluation part)."""
    return metrics.get("merge_seconds", 0.0) + sum(metrics.get("part_seconds", {}).values())


def method_row(
    config: BenchConfig, name: str, seeds: list[int], cells: list[dict[str, Any]], backbone: dict[str, Any]
) -> dict[str, Any]:
    method = config.method(name)
    per_seed = [table_columns(cell, config.harmful_label, config.benign_label) for cell in cells]
    columns = {column: summarise([c.get(column) for c in per_seed]) for column in per_seed[0]}
    columns["derive + importance (s)"] = summarise([cell["derive_seconds"] for cell in cells])
    columns["merge (s)"] = summarise([cell["merge_seconds"] for cell in cells])
    columns["inference cost (× backbone)"] = summarise([inference_cost(cell, backbone) for cell in cells])
    if method.kind == "decoding":
        for column in ("MMLU (%) ↑", "GSM8K (%) ↑", "KL (nats/token) ↓"):
            columns[column] = summarise([NOT_MEASURED])
    return {"description": method.description, "seeds": seeds, "columns": columns,
            "jailbreaks": {family: summarise([c["jailbreak_harmful_response_rate"].get(family) for c in cells])
                           for family in cells[0].get("jailbreak_harmful_response_rate", {})}}  # fmt: skip


def inference_cost(cell: dict[str, Any], backbone: dict[str, Any]) -> float | None:
    """Generation time per token against the backbone's, only when both were timed in one run: a cell
    reused from an earlier run carries that run's host speed, which may differ by more than the
    methods do. Cells saved before runs were recorded are not compared either."""
    run = backbone.get("timed_in")
    if cell != backbone and (run is None or cell.get("timed_in") != run):
        return NOT_MEASURED
    return cell["generation"]["seconds_per_token"] / backbone["generation"]["seconds_per_token"]


def bench_result(
    config: BenchConfig, command: str, rows: dict[str, Any], seconds: float, compute_seconds: float, complete: bool
) -> dict[str, Any]:
    """``compute_seconds``: the derivation, importance and cell times the table rests on, cached ones
    included (``wall_seconds`` is only this invocation, which may have resumed from a cache)."""
    header = result_header(config, command, seconds, complete, BENCH_SCHEMA_VERSION)
    return {**header, "compute_seconds": round(compute_seconds, 1), "methods": rows,
            "statistics": paired_statistics(config, list(rows)),
            "config": config.model_dump(mode="json")}  # fmt: skip


def write_bench_results(config: BenchConfig, result: dict[str, Any]) -> tuple[Path, Path]:
    json_path = config.output_dir / f"{config.name}.json"
    markdown_path = config.output_dir / f"{config.name}.md"
    write_json(json_path, result)
    write_text_atomic(markdown_path, bench_markdown(result))
    if any("tuning" in row for row in result["methods"].values()):
        plot_bench_fronts(result, config.output_dir / f"{config.name}.png")
    return json_path, markdown_path
