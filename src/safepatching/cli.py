"""The `safepatching` command line: thin wrappers that fill the one config and call the API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from safepatching.config import (
    BenchConfig,
    ContinualConfig,
    PipelineConfig,
    StrictModel,
    build_config,
    dump_config,
    parse_overrides,
)
from safepatching.errors import SafePatchingError

app = typer.Typer(
    help="Post safety alignment of chat LLMs with SafePatching.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
STATE = {"debug": False}

ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a setting: dotted.key=value")]
Force = Annotated[bool, typer.Option(help="overwrite an existing output")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data directory (or $SAFEPATCHING_DATA_DIR)")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log each step")] = False,
) -> None:
    STATE["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose or debug else logging.WARNING, format="%(levelname)s %(message)s")


def show_progress(no_progress: bool) -> bool:
    """Our bars take the flag directly; the hub's and transformers' own bars (downloads, weight
    loading) read an environment switch when first imported, or are switched off if already loaded."""
    if no_progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    return not no_progress


def refuse_existing(path: Path, force: bool) -> None:
    """Outputs are never overwritten by accident: the check runs before any slow work starts."""
    if path.exists() and not force:
        raise SafePatchingError(f"{path} already exists.", "pass --force to overwrite it or choose another --out")


def load_cli_config(
    config: Path | None,
    overrides: list[str] | None,
    flags: dict[str, Any],
    model: type[StrictModel] = PipelineConfig,
    quick: bool = False,
) -> Any:
    """CLI flags become overrides on top of the YAML file, exactly like the Python API's keywords."""
    merged = parse_overrides(overrides or [])
    for dotted, value in flags.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = str(value) if isinstance(value, Path) else value
    return build_config(config, merged, model, quick)


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="demo model name, hub id, folder or .gguf")
    ] = "qwen2.5-coder-0.5b-instruct",
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
    overrides: Overrides = None,
    no_progress: NoProgress = False,
) -> None:
    """Run the whole pipeline offline on a built-in model and built-in data; print before/after."""
    progress = show_progress(no_progress)
    from safepatching.pipeline import run_pipeline

    name = Path(model).name.removesuffix(".gguf")
    config = load_cli_config(None, overrides, {"model": model, "output_dir": out or Path("runs") / f"demo-{name}"})
    run_pipeline(config, progress=progress)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="run directory (overrides output_dir)")] = None,
    no_progress: NoProgress = False,
) -> None:
    """Run the whole pipeline from a config; finished stages are reused on rerun."""
    progress = show_progress(no_progress)
    from safepatching.pipeline import run_pipeline

    resolved = load_cli_config(config, overrides, {"data_dir": data_dir, "output_dir": out})
    run_pipeline(resolved, progress=progress)


Quick = Annotated[bool, typer.Option("--quick", help="apply the config's quick: overrides (a small, fast run)")]


def command_line() -> str:
    """The exact command, written into bench and continual results."""
    return " ".join(["safepatching", *sys.argv[1:]])


def run_experiment(kind: str, config: Path, quick: bool, overrides, data_dir, no_progress: bool) -> None:
    """`bench` and `continual`: fill their config like every other command and run it."""
    progress = show_progress(no_progress)
    if kind == "bench":
        from safepatching.bench import run_bench as runner
    else:
        from safepatching.continual import run_continual as runner
    model = BenchConfig if kind == "bench" else ContinualConfig
    resolved = load_cli_config(config, overrides, {"pipeline.data_dir": data_dir}, model, quick)
    runner(resolved, command_line(), progress=progress)


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="bench YAML config (see configs/bench-reference.yaml)")],
    quick: Quick = False,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    no_progress: NoProgress = False,
) -> None:
    """Compare SafePatching with GA, NPO, ablations, merging and decoding-time baselines over seeds."""
    run_experiment("bench", config, quick, overrides, data_dir, no_progress)


@app.command()
def continual(
    config: Annotated[Path, typer.Argument(help="continual YAML config (see configs/continual-reference.yaml)")],
    quick: Quick = False,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    no_progress: NoProgress = False,
) -> None:
    """Patch round after round on disjoint harmful data; evaluate after every round (table + plot)."""
    run_experiment("continual", config, quick, overrides, data_dir, no_progress)


@app.command("eval", context_settings={"allow_extra_args": True})
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
    from safepatching.pipeline import compare_models

    extra = list(ctx.args)
    if extra and not compare:
        raise SafePatchingError(f"unexpected argument {extra[0]!r}.", "list several models after --compare")
    models = [*(compare or []), *extra] or [m for m in (reference, model) if m]
    if not models:
        raise SafePatchingError("no model to evaluate.", "pass --model MODEL (and --reference BASE) or --compare A B")
    cfg = load_cli_config(config, overrides, {"data_dir": data_dir})
    compare_models(models, cfg, out, progress=progress)


@app.command("config")
def show_config(
    config: Annotated[Path | None, typer.Argument(help="YAML config file")] = None,
    overrides: Overrides = None,
) -> None:
    """Print the fully resolved config (every key with its value) as YAML."""
    typer.echo(dump_config(load_cli_config(config, overrides, {})), nl=False)


@app.command()
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
    progress = show_progress(no_progress)
    from safepatching.derive import checkpoint_dir_for, derive_patch, save_patch
    from safepatching.models import load_model
    from safepatching.pipeline import harmful_pairs

    if direction not in ("ascent", "descent", "npo"):
        raise SafePatchingError(f"unknown direction {direction!r}.", "use --direction ascent, descent or npo")
    cfg = load_cli_config(config, overrides, {"model": model, "harmful_train.source": data, "data_dir": data_dir})
    refuse_existing(out, force)
    pairs = harmful_pairs(cfg)
    backbone, tokenizer = load_model(cfg.model, cfg.compute_dtype, cfg.trust_remote_code, cfg.allow_pickle)
    patch = derive_patch(backbone, tokenizer, pairs, direction, cfg.derive, cfg.seed, progress, checkpoint_dir_for(out))
    save_patch(patch, out, {"base_model": cfg.model})
    err.print(f"{direction} patch ({patch.info['steps']} steps, stop: {patch.info['stop_reason']}) written to {out}")


@app.command()
def score(
    patch: Annotated[Path, typer.Option(help="patch directory; scores are taken at backbone + patch")],
    out: Annotated[Path, typer.Option(help="safetensors file for the scores")],
    model: Annotated[str | None, typer.Option(help="backbone")] = None,
    data: Annotated[str | None, typer.Option(help="harmful pairs source")] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    no_progress: NoProgress = False,
    force: Force = False,
) -> None:
    """Compute SNIP importance |w * dL/dw| of backbone + patch on the harmful pairs."""
    progress = show_progress(no_progress)
    from safepatching.derive import load_patch
    from safepatching.importance import patched, snip_scores
    from safepatching.io import save_tensors
    from safepatching.models import load_model
    from safepatching.pipeline import harmful_pairs

    cfg = load_cli_config(config, overrides, {"model": model, "harmful_train.source": data, "data_dir": data_dir})
    refuse_existing(out, force)
    pairs = harmful_pairs(cfg)
    loaded = load_patch(patch)
    backbone, tokenizer = load_model(cfg.model, cfg.compute_dtype, cfg.trust_remote_code, cfg.allow_pickle)
    with patched(backbone, loaded.deltas):
        scores = snip_scores(backbone, tokenizer, pairs, list(loaded.deltas), cfg.importance, progress=progress)
    save_tensors(out, scores)
    err.print(f"importance scores for {len(scores)} tensors written to {out}")


@app.command()
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
    from safepatching.derive import load_patch
    from safepatching.models import DTYPES, weights_folder
    from safepatching.patching import PatchMerger, settings_record, write_patched_model
    from safepatching.shards import LazyTensors

    cfg = load_cli_config(config, overrides, {"model": model})
    refuse_existing(out, force)
    safety, over_safety = load_patch(safety_patch), load_patch(over_safety_patch)
    scores = [LazyTensors(p) if p else None for p in (safety_scores, over_safety_scores)]
    merger = PatchMerger(safety, over_safety, cfg.merge, cfg.seed, *scores)
    counts = write_patched_model(
        weights_folder(cfg.model, cfg.allow_pickle),
        out,
        merger,
        None if cfg.merge.output_dtype == "auto" else DTYPES[cfg.merge.output_dtype],
        cfg.model,
        settings_record(cfg, safety, over_safety),
        cfg.merge.shard_size_mb,
        overwrite=force,
        progress=progress,
    )
    err.print(f"patched model ({100 * counts['changed_fraction']:.2f}% of patchable entries changed) written to {out}")


ForceMismatch = Annotated[
    bool, typer.Option("--force-mismatch", help="proceed although the model's fingerprint differs from the patch's")
]
ShardSize = Annotated[int, typer.Option(help="output shard size in MB")]


@app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="patch folder to write")],
    run_dir: Annotated[
        Path | None, typer.Option("--run", help="a run directory (uses its model/ and backbone)")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="patched model folder")] = None,
    base: Annotated[str | None, typer.Option(help="the base model the patched one came from")] = None,
    force: Force = False,
    no_progress: NoProgress = False,
) -> None:
    """Export the entries a merge changed as a sparse patch bound to its base by a fingerprint."""
    progress = show_progress(no_progress)
    from safepatching.models import weights_folder
    from safepatching.patchfile import export_patch, provenance_from_model

    if run_dir is not None:
        config = build_config(run_dir / "config.yaml", {})
        model, base = run_dir / "model", base or config.model
    if model is None or base is None:
        raise SafePatchingError(
            "export needs a patched model and its base.", "pass --run RUN_DIR or --model DIR --base MODEL"
        )
    refuse_existing(out, force)
    provenance = {"base_model": base, **provenance_from_model(model)}
    meta = export_patch(weights_folder(base), model, out, provenance, overwrite=force, progress=progress)
    err.print(
        f"patch with {meta['changed_entries']:,} changed entries ({meta['patch_bytes'] / 2**20:.1f} MiB, "
        f"{100 * meta['patch_bytes'] / meta['model_bytes']:.1f}% of the model) written to {out}"
    )


@app.command("apply")
def apply(
    patches: Annotated[list[Path], typer.Argument(help="patch folders, applied in order")],
    base: Annotated[str, typer.Option(help="model to patch (folder, demo name or hub id)")],
    out: Annotated[Path, typer.Option(help="model folder to write")],
    force_mismatch: ForceMismatch = False,
    shard_size_mb: ShardSize = 2000,
    force: Force = False,
    no_progress: NoProgress = False,
) -> None:
    """Apply one or more patches to a base model, streaming tensor by tensor into a new folder."""
    progress = show_progress(no_progress)
    from safepatching.models import weights_folder
    from safepatching.patchfile import apply_patches

    refuse_existing(out, force)
    record = apply_patches(
        patches,
        weights_folder(base),
        out,
        force_mismatch,
        shard_size_mb,
        overwrite=force,
        progress=progress,
    )
    err.print(
        f"{len(patches)} patch(es) applied; model written to {out} (fingerprint {record['output_fingerprint'][:16]})"
    )


@app.command()
def revert(
    patch: Annotated[Path, typer.Argument(help="patch folder to undo")],
    model: Annotated[str, typer.Option(help="patched model (folder, demo name or hub id)")],
    out: Annotated[Path, typer.Option(help="model folder to write")],
    force_mismatch: ForceMismatch = False,
    shard_size_mb: ShardSize = 2000,
    force: Force = False,
    no_progress: NoProgress = False,
) -> None:
    """Undo a patch exactly, bit for bit on the entries it touched, into a new model folder."""
    progress = show_progress(no_progress)
    from safepatching.models import weights_folder
    from safepatching.patchfile import revert_patch

    refuse_existing(out, force)
    record = revert_patch(
        patch,
        weights_folder(model),
        out,
        force_mismatch,
        shard_size_mb,
        overwrite=force,
        progress=progress,
    )
    err.print(f"patch reverted; model written to {out} (fingerprint {record['output_fingerprint'][:16]})")


@app.command()
def inspect(
    patch: Annotated[Path, typer.Argument(help="patch folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Show what a patch changes, per layer and per module."""
    from safepatching.patchfile import inspect_patch
    from safepatching.report import print_patch_summary

    summary = inspect_patch(patch)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_patch_summary(summary, Console())


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except SafePatchingError as exc:
        if STATE["debug"]:
            raise
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; finished stages are kept and a rerun resumes from them")
        sys.exit(130)
    except Exception as exc:  # usage errors and anything unexpected
        # Typer may bring its own copy of click, so usage errors are recognised by shape, not class.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if STATE["debug"]:
            raise
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
