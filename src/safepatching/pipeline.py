"""The whole SafePatching run: derive, score, merge, evaluate; each stage saved and reused on rerun.

A stage is skipped when its output exists and was made from the same settings (a fingerprint of
the settings it depends on is stored beside it); otherwise it is recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from safepatching import __version__
from safepatching.config import EvalConfig, PipelineConfig, dump_config, fingerprint
from safepatching.data import Example, assert_disjoint, drop_overlap, load_pairs
from safepatching.derive import (
    Direction,
    Patch,
    checkpoint_dir_for,
    derive_patch,
    load_patch,
    save_patch,
    target_parameter_names,
)
from safepatching.evaluate import EvalSets, evaluate_model, harmless_responses, load_eval_sets
from safepatching.generation import vllm_available
from safepatching.importance import patched, snip_scores
from safepatching.io import read_json, save_tensors, write_json, write_text_atomic
from safepatching.merge import MERGE_METHODS
from safepatching.models import DTYPES, load_model, weights_folder
from safepatching.patching import PatchMerger, settings_record, write_patched_model
from safepatching.report import (
    SUMMARY_SCHEMA_VERSION,
    before_after_markdown,
    comparison_markdown,
    print_before_after,
    read_jsonl,
    save_eval,
    stage_meter,
)
from safepatching.shards import LazyTensors

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    summary: dict[str, Any]
    stages: dict[str, Any] = field(default_factory=dict)


def stage_is_fresh(directory: Path, key: str) -> bool:
    """Whether ``directory`` holds a finished stage made from the settings fingerprinted as ``key``."""
    stage = directory / STAGE_FILE
    return stage.exists() and read_json(stage).get("fingerprint") == key


def mark_stage(directory: Path, key: str, extra: dict[str, Any] | None = None) -> None:
    write_json(directory / STAGE_FILE, {"fingerprint": key, "safepatching": __version__, **(extra or {})})


class SafePatchingRun:
    """Runs the pipeline for one config; the Python API behind `safepatching run` and `demo`."""

    def __init__(
        self,
        config: PipelineConfig,
        progress: bool = True,
        console: Console | None = None,
        loaded: tuple[Any, Any] | None = None,
        base_state: str | None = None,
    ):
        """``loaded`` is an in-memory (model, tokenizer) to patch instead of loading ``config.model``;
        ``base_state`` then names its weights (e.g. the rounds already applied), so cached stages of
        other weights are not reused."""
        self.config = config
        self.progress = progress
        self.console = console or Console(stderr=True)
        self.out = Path(config.output_dir)
        self.stages: dict[str, Any] = {}
        self._model, self._tokenizer = loaded or (None, None)
        self.base_state = base_state
        self._pairs: list[Example] | None = None

    # -- shared inputs -------------------------------------------------------------------------------
    def backbone(self):
        if self._model is None:
            with stage_meter(self.stages, "load_backbone"):
                self._model, self._tokenizer = load_model(
                    self.config.model,
                    self.config.compute_dtype,
                    self.config.trust_remote_code,
                    self.config.allow_pickle,
                )
        return self._model, self._tokenizer

    def harmful_pairs(self) -> list[Example]:
        if self._pairs is None:
            self._pairs = harmful_pairs(self.config)
        return self._pairs

    def eval_sets(self, pairs: list[Example]) -> EvalSets:
        sets = load_eval_sets(self.config.eval, self.config.data_dir)
        assert_disjoint(pairs, sets.named())
        return sets

    # -- stage keys ----------------------------------------------------------------------------------
    def derive_key(self) -> str:
        c = self.config
        parts = [c.model, c.seed, c.compute_dtype, c.harmful_train, c.derive.training_settings()]
        if c.harmful_train_extra or c.drop_eval_overlap:  # keyed by content: dropping depends on the eval sets
            parts.append([(e.prompt, e.response) for e in self.harmful_pairs()])
        return fingerprint(*parts, *([self.base_state] if self.base_state else []))

    def importance_key(self) -> str:
        return fingerprint(self.derive_key(), self.config.importance)

    def merge_key(self) -> str:
        return fingerprint(self.importance_key(), self.config.merge)

    # -- stages --------------------------------------------------------------------------------------
    def derive(self, pairs: list[Example]) -> tuple[Patch, Patch]:
        return self.derive_one(pairs, "safety", "ascent"), self.derive_one(pairs, "over_safety", "descent")

    def derive_one(self, pairs: list[Example], label: str, direction: Direction) -> Patch:
        """One patch (saved under patches/<label>), reused when its settings have not changed."""
        directory = self.out / "patches" / label
        if stage_is_fresh(directory, self.derive_key()):
            log.info("reusing %s patch from %s", label, directory)
            return load_patch(directory)
        model, tokenizer = self.backbone()
        with stage_meter(self.stages, f"derive_{label}"):
            patch = derive_patch(
                model,
                tokenizer,
                pairs,
                direction,
                self.config.derive,
                self.config.seed,
                self.progress,
                checkpoint_dir_for(directory),
            )
            save_patch(patch, directory, {"label": label, "base_model": self.config.model})
        mark_stage(directory, self.derive_key(), self.stages[f"derive_{label}"])
        return patch

    def importance(self, pairs: list[Example], safety: Patch, over_safety: Patch):
        if not MERGE_METHODS[self.config.merge.method].needs_importance:
            return None, None
        directory = self.out / "importance"
        if stage_is_fresh(directory, self.importance_key()):
            return LazyTensors(directory / "safety.safetensors"), LazyTensors(directory / "over_safety.safetensors")
        model, tokenizer = self.backbone()
        names = target_parameter_names(model, self.config.derive.target_modules)
        scores = {}
        for label, patch in (("safety", safety), ("over_safety", over_safety)):
            with stage_meter(self.stages, f"importance_{label}"), patched(model, patch.deltas):
                scores[label] = snip_scores(
                    model, tokenizer, pairs, names, self.config.importance, f"importance ({label})", self.progress
                )
            save_tensors(directory / f"{label}.safetensors", scores[label])
        seconds = sum(self.stages[f"importance_{label}"]["wall_seconds"] for label in scores)
        mark_stage(directory, self.importance_key(), {"wall_seconds": round(seconds, 1)})
        return scores["safety"], scores["over_safety"]

    def merge(self, safety: Patch, over_safety: Patch, safety_scores, over_safety_scores) -> Path:
        directory = self.out / "model"
        if stage_is_fresh(directory / "safepatching", self.merge_key()):
            return directory
        settings = self.config.merge
        with stage_meter(self.stages, "merge"):
            merger = PatchMerger(safety, over_safety, settings, self.config.seed, safety_scores, over_safety_scores)
            counts = write_patched_model(
                weights_folder(self.config.model, self.config.allow_pickle),
                directory,
                merger,
                None if settings.output_dtype == "auto" else DTYPES[settings.output_dtype],
                self.config.model,
                settings_record(self.config, safety, over_safety),
                settings.shard_size_mb,
                progress=self.progress,
            )
        if counts["rounding_loss_fraction"] > 0.05:
            log.warning(
                "%.0f%% of patched entries round away in the output dtype; set merge.output_dtype: float32",
                100 * counts["rounding_loss_fraction"],
            )
        mark_stage(directory / "safepatching", self.merge_key(), {"counts": counts, **self.stages["merge"]})
        return directory

    def evaluate(self, sets: EvalSets, model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        eval_dir = self.out / "eval"
        backbone_key = fingerprint(self.config.model, self.config.compute_dtype, self.config.eval, self.config.data_dir)
        model, tokenizer = self.backbone()
        if stage_is_fresh(eval_dir / "backbone", backbone_key):
            before = read_json(eval_dir / "backbone" / "metrics.json")
            records = read_jsonl(eval_dir / "backbone" / "records.jsonl")
        else:
            with stage_meter(self.stages, "eval_backbone"):
                before, records = evaluate_model(
                    model,
                    tokenizer,
                    sets,
                    self.config.eval,
                    label="backbone",
                    progress=self.progress,
                    data_dir=self.config.data_dir,
                    model_path=serving_path(self.config.model, self.config.eval, self.config.allow_pickle),
                )
            save_eval(eval_dir / "backbone", before, records)
            mark_stage(eval_dir / "backbone", backbone_key)
        patched_key = fingerprint(backbone_key, self.merge_key())
        if stage_is_fresh(eval_dir / "patched", patched_key):
            return before, read_json(eval_dir / "patched" / "metrics.json")
        with stage_meter(self.stages, "eval_patched"):
            patched_model, _ = load_model(str(model_dir), self.config.compute_dtype)
            after, patched_records = evaluate_model(
                patched_model,
                tokenizer,
                sets,
                self.config.eval,
                reference=model,
                reference_harmless=harmless_responses(records),
                label="patched",
                progress=self.progress,
                data_dir=self.config.data_dir,
                model_path=serving_path(str(model_dir), self.config.eval),
            )
            del patched_model
        save_eval(eval_dir / "patched", after, patched_records)
        mark_stage(eval_dir / "patched", patched_key)
        return before, after

    # -- everything ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "config.yaml", dump_config(self.config))
        pairs = self.harmful_pairs()
        sets = self.eval_sets(pairs)
        safety, over_safety = self.derive(pairs)
        safety_scores, over_safety_scores = self.importance(pairs, safety, over_safety)
        model_dir = self.merge(safety, over_safety, safety_scores, over_safety_scores)
        before, after = self.evaluate(sets, model_dir)
        summary = {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "safepatching": __version__,
            "model": self.config.model,
            "patched_model": str(model_dir),
            "backbone": before,
            "patched": after,
            "patches": {
                "safety": {k: safety.info[k] for k in ("steps", "stop_reason", "nll_history")},
                "over_safety": {k: over_safety.info[k] for k in ("steps", "stop_reason", "nll_history")},
            },
            "stages": self.stages,
        }
        write_json(self.out / "summary.json", summary)
        write_text_atomic(self.out / "summary.md", before_after_markdown(before, after))
        print_before_after(before, after, model_dir, Console())
        return RunResult(self.out, model_dir, summary, self.stages)


def harmful_pairs(config: PipelineConfig) -> list[Example]:
    """The pairs the patches are derived from: every harmful_train source, less (when asked) the
    prompts an evaluation set holds."""
    pairs = load_pairs(config.harmful_train_specs(), config.data_dir)
    if config.drop_eval_overlap:
        pairs = drop_overlap(pairs, load_eval_sets(config.eval, config.data_dir).named())
    return pairs


def serving_path(spec: str, settings: EvalConfig, allow_pickle: bool = False) -> str | None:
    """The folder vLLM could serve ``spec`` from, worked out only when vLLM may be used."""
    if settings.backend == "hf" or (settings.backend == "auto" and not vllm_available()):
        return None
    return str(weights_folder(spec, allow_pickle))


def compare_models(models: list[str], config: PipelineConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Evaluate several models on the same sets; the first is the reference for KL."""
    sets = load_eval_sets(config.eval, config.data_dir)
    reference, tokenizer = load_model(models[0], config.compute_dtype, config.trust_remote_code, config.allow_pickle)
    results: dict[str, Any] = {}
    reference_records: list[dict[str, Any]] = []
    for index, spec in enumerate(models):
        label = f"{index}-{Path(spec).name or spec}"
        stages: dict[str, Any] = {}
        with stage_meter(stages, "eval"):
            model = (
                reference
                if index == 0
                else load_model(spec, config.compute_dtype, config.trust_remote_code, config.allow_pickle)[0]
            )
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
                model_path=serving_path(spec, config.eval, config.allow_pickle),
            )
            del model
        if index == 0:
            reference_records = records
        save_eval(out_dir / label, metrics, records)
        results[spec] = {**metrics, "peak_rss_gib": stages["eval"]["peak_rss_gib"]}
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "safepatching": __version__,
        "reference": models[0],
        "eval": config.eval.model_dump(mode="json"),
        "models": results,
    }
    write_json(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "summary.md", comparison_markdown(results))
    Console().print(comparison_markdown(results))
    return summary


def run_pipeline(config: PipelineConfig, progress: bool = True) -> RunResult:
    """Run SafePatching end to end for ``config`` and return where everything was written."""
    return SafePatchingRun(config, progress).run()
