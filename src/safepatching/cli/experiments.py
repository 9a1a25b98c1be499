"""Experiment commands: the demo, a whole run, bench, continual PSA, the validation sweep and tuning."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated

import typer

from safepatching.cli.options import DataDir, NoProgress, Overrides, Quick, command_line, load_cli_config, show_progress
from safepatching.config.settings import DATA_DIR_ENV


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
    name = Path(model).name.removesuffix(".gguf")
    config = load_cli_config(None, overrides, {"model": model, "output_dir": out or Path("runs") / f"demo-{name}"})
    from safepatching.experiments.pipeline import run_pipeline  # after the config: its errors come without delay

    run_pipeline(config, progress=progress)


def run(
    config: Annotated[Path, typer.Argument(help="YAML config file")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="run directory (overrides output_dir)")] = None,
    no_progress: NoProgress = False,
) -> None:
    """Run the whole pipeline from a config; finished stages are reused on rerun."""
    progress = show_progress(no_progress)
    resolved = load_cli_config(config, overrides, {"data_dir": data_dir, "output_dir": out})
    from safepatching.experiments.pipeline import run_pipeline

    run_pipeline(resolved, progress=progress)


ExperimentConfigFile = Annotated[
    Path,
    typer.Argument(help="YAML config (see configs/bench-reference.yaml, continual-reference.yaml, directions-reference.yaml)"),
]
EXPERIMENTS = {  # kind: (its config, the module and function that run it)
    "bench": ("BenchConfig", "safepatching.experiments.bench", "run_bench"),
    "continual": ("ContinualConfig", "safepatching.experiments.continual", "run_continual"),
    "directions": ("DirectionsConfig", "safepatching.experiments.directions", "run_directions"),
}


def experiment_command(kind: str, summary: str):
    """`bench`, `continual` and `directions` take the same options: a config file, --quick, --set and --data-dir."""

    def command(
        config: ExperimentConfigFile,
        quick: Quick = False,
        overrides: Overrides = None,
        data_dir: DataDir = None,
        no_progress: NoProgress = False,
    ) -> None:
        progress = show_progress(no_progress)
        settings, module, function = EXPERIMENTS[kind]
        model = getattr(importlib.import_module("safepatching.config.experiments"), settings)
        resolved = load_cli_config(config, overrides, {"pipeline.data_dir": data_dir}, model, quick)
        runner = getattr(importlib.import_module(module), function)  # after the config: its errors come first
        runner(resolved, command_line(), progress=progress)

    command.__name__, command.__doc__ = kind, summary
    return command


bench = experiment_command(
    "bench",
    "Compare SafePatching with GA, NPO, ablations, merging and decoding-time baselines over seeds.",
)
continual = experiment_command(
    "continual",
    "Patch round after round on disjoint harmful data; evaluate after every round (table + plot).",
)
directions = experiment_command(
    "directions",
    "Report the backbone's refusal and false-refusal directions layer by layer (norms, cosine, probes).",
)


def sweep(
    config: Annotated[Path, typer.Argument(help="bench, tune or pipeline config, or a run directory")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="data directory (or $SAFEPATCHING_DATA_DIR)")] = None,
    vary: Annotated[list[str] | None, typer.Option(help="KEY=V1,V2: one setting at a time (repeat the flag)")] = None,
    grid: Annotated[list[str] | None, typer.Option(help="KEY=V1,V2: every combination (repeat the flag)")] = None,
    harmful_split: Annotated[str, typer.Option(help="validation rows of the training source")] = "train[48:72]",
    benign: Annotated[list[str] | None, typer.Option(help="NAME=SOURCE@SPLIT benign validation set (repeat)")] = None,
    changes: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="KEY=VALUE: change the config itself first (repeat)")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per validation reply")] = 32,
    out: Annotated[Path | None, typer.Option(help="write OUT.json and OUT.md")] = None,
) -> None:
    """Validation refusal rates of changed merge or training settings (training settings derive their own patches)."""
    from safepatching.config.experiments import SweepConfig
    from safepatching.config.loading import build_config

    flags = {"vary": vary, "grid": grid, "benign": benign, "set": changes, "out": out}
    request = build_config(
        None,
        {
            "config": str(config),
            "data_dir": str(data_dir or os.environ.get(DATA_DIR_ENV, "")) or None,
            "harmful_split": harmful_split,
            "max_new_tokens": max_new_tokens,
            **{key: value if not isinstance(value, Path) else str(value) for key, value in flags.items() if value},
        },
        SweepConfig,
    )
    from safepatching.experiments.sweep import run_sweep

    run_sweep(request, command_line())


def tune(
    config: Annotated[Path, typer.Argument(help="YAML tune config (see configs/tune-reference.yaml)")],
    trials: Annotated[
        int | None, typer.Option(min=1, help="add N trials to the study (default: up to tune.trials)")
    ] = None,
    new_study: Annotated[bool, typer.Option(help="start a new study even if WORK_DIR holds another config's")] = False,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    no_progress: NoProgress = False,
) -> None:
    """Search merge (and training) knobs for a Pareto front of harmful vs benign refusal; choose a point."""
    from safepatching.config.experiments import TuneConfig

    progress = show_progress(no_progress)
    resolved = load_cli_config(config, overrides, {"pipeline.data_dir": data_dir}, TuneConfig)
    from safepatching.experiments.tune import run_tune

    result = run_tune(resolved, command_line(), trials, new_study, progress)
    out = resolved.output_dir / resolved.name
    chosen = result["chosen"]
    print(f"front of {len(result['front'])} point(s) from {len(result['trials'])} trial(s): {out}.md, .json, .png")
    print(f"chosen: {chosen['config']}" if chosen else "chosen: none (no trial met the constraints)")
