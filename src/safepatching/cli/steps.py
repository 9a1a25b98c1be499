"""Stage commands: derive one patch, score its importance, merge, evaluate, print the config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safepatching.cli.options import (
    ConfigFile,
    DataDir,
    Force,
    NoProgress,
    Overrides,
    command_line,
    err,
    load_cli_config,
    refuse_existing,
    show_progress,
)
from safepatching.config.experiments import config_model_of
from safepatching.config.loading import dump_config
from safepatching.config.settings import PipelineConfig
from safepatching.errors import SafePatchingError

DIRECTION_LABELS = {"ascent": "safety", "descent": "over_safety", "npo": "npo"}  # patch labels of the derivations


def evaluate(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="model to evaluate (KL is taken against --reference)")] = None,
    reference: Annotated[str | None, typer.Option(help="reference model for KL, e.g. the backbone")] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(help="evaluate several models side by side (--compare A B C); the first is the reference"),
    ] = None,
    out: Annotated[Path, typer.Option(help="directory for metrics, records and summary")] = Path("runs/eval"),
    config: ConfigFile = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    no_progress: NoProgress = False,
) -> None:
    """Evaluate safety, over-safety and utility (KL to the first model, optional MMLU/GSM8K) side by side."""
    progress = show_progress(no_progress)
    from safepatching.experiments.compare import compare_models

    extra = list(ctx.args)
    if extra and not compare:
        raise SafePatchingError(f"unexpected argument {extra[0]!r}.", "list several models after --compare")
    models = [*(compare or []), *extra] or [m for m in (reference, model) if m]
    if not models:
        raise SafePatchingError("no model to evaluate.", "pass --model MODEL (and --reference BASE) or --compare A B")
    cfg = load_cli_config(config, overrides, {"data_dir": data_dir})
    compare_models(models, cfg, out, progress=progress, command=command_line())


def show_config(
    config: Annotated[Path | None, typer.Argument(help="YAML config file")] = None,
    overrides: Overrides = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="print the settings reference (docs/configuration.md) instead")
    ] = False,
) -> None:
    """Print the fully resolved config (every key with its value) as YAML: a pipeline, bench, continual or
    tune config, told apart by its keys."""
    if reference:
        from safepatching.config.reference import settings_reference

        typer.echo(settings_reference(), nl=False)
        return
    model = config_model_of(config) if config else PipelineConfig
    typer.echo(dump_config(load_cli_config(config, overrides, {}, model)), nl=False)


def derive(
    direction: Annotated[
        str, typer.Option(help="ascent (safety patch), descent (over-safety patch) or npo (NPO unlearning patch)")
    ],
    out: Annotated[Path, typer.Option(help="patch directory to write")],
    model: Annotated[str | None, typer.Option(help="backbone")] = None,
    data: Annotated[str | None, typer.Option(help="harmful pairs source (file, builtin:NAME, hub id)")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    no_progress: NoProgress = False,
    force: Force = False,
) -> None:
    """Derive one patch by fine-tuning on harmful (prompt, response) pairs."""
    if direction not in DIRECTION_LABELS:
        raise SafePatchingError(f"unknown direction {direction!r}.", "use --direction ascent, descent or npo")
    stages = pipeline_stages(config, overrides, model, data, data_dir, out, force, no_progress)
    patch = stages.patches.derive_one(stages.harmful_pairs(), DIRECTION_LABELS[direction], direction, out, refresh=True)
    err.print(f"{direction} patch ({patch.info['steps']} steps, stop: {patch.info['stop_reason']}) written to {out}")


def score(
    patch: Annotated[Path, typer.Option(help="patch directory; scores are taken at backbone + patch")],
    out: Annotated[Path, typer.Option(help="safetensors file for the scores")],
    config: ConfigFile = None,
    overrides: Overrides = None,
    model: Annotated[str | None, typer.Option(help="backbone")] = None,
    data: Annotated[str | None, typer.Option(help="harmful pairs source")] = None,
    data_dir: DataDir = None,
    force: Force = False,
    no_progress: NoProgress = False,
) -> None:
    """Compute SNIP importance |w * dL/dw| of backbone + patch on the harmful pairs."""
    stages = pipeline_stages(config, overrides, model, data, data_dir, out, force, no_progress)
    from safepatching.method.dense import load_dense_patch
    from safepatching.storage.files import save_tensors

    loaded = load_dense_patch(patch)
    scores = stages.patches.score(stages.harmful_pairs(), loaded, loaded.info.get("label", "patch"))
    save_tensors(out, scores)
    err.print(f"importance scores for {len(scores)} tensors written to {out}")


def merge(
    safety_patch: Annotated[Path, typer.Option(help="safety patch directory (gradient ascent)")],
    over_safety_patch: Annotated[Path, typer.Option(help="over-safety patch directory (gradient descent)")],
    out: Annotated[Path, typer.Option(help="model folder to write")],
    model: Annotated[str | None, typer.Option(help="backbone")] = None,
    safety_scores: Annotated[Path | None, typer.Option(help="importance of backbone + safety patch")] = None,
    over_safety_scores: Annotated[Path | None, typer.Option(help="importance of backbone + over-safety patch")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    force: Force = False,
) -> None:
    """Patch the backbone: theta + alpha*(M_s*P_s) + beta*(M_o*P_o), written as a HF model folder."""
    progress = show_progress(no_progress)
    cfg = load_cli_config(config, overrides, {"model": model})
    refuse_existing(out, force)
    from safepatching.experiments.stages import Stages
    from safepatching.method.dense import load_dense_patch
    from safepatching.storage.shards import LazyTensors

    safety, over_safety = load_dense_patch(safety_patch), load_dense_patch(over_safety_patch)
    scores = [LazyTensors(p) if p else None for p in (safety_scores, over_safety_scores)]
    counts = Stages(cfg, progress, evaluates=False).merge(safety, over_safety, scores, out, refresh=True)
    err.print(f"patched model ({100 * counts['changed_fraction']:.2f}% of patchable entries changed) written to {out}")


def pipeline_stages(config, overrides, model, data, data_dir, out: Path, force: bool, no_progress: bool):
    """The stages of the config the flags describe; an existing output is refused before any work."""
    progress = show_progress(no_progress)
    cfg = load_cli_config(config, overrides, {"model": model, "harmful_train.source": data, "data_dir": data_dir})
    refuse_existing(out, force)
    from safepatching.experiments.stages import Stages

    return Stages(cfg, progress, evaluates=False)  # derive and score: the eval settings are not used
