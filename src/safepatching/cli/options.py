"""Options and helpers every command shares: config filling, progress switch, output refusal."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from safepatching.config.loading import build_config, parse_overrides
from safepatching.config.settings import PipelineConfig, StrictModel
from safepatching.errors import SafePatchingError

err = Console(stderr=True, highlight=False, soft_wrap=True)  # paths and names are not coloured as numbers


ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]


Overrides = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a setting: dotted.key=value")]


Force = Annotated[bool, typer.Option(help="overwrite an existing output")]


DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data directory (or $SAFEPATCHING_DATA_DIR)")]


NoProgress = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]


def show_progress(no_progress: bool) -> bool:
    """Our bars take the flag directly; the hub's and transformers' own bars (downloads, weight
    loading) read an environment switch when first imported, or are switched off if already loaded.
    TQDM_DISABLE, read when tqdm is first imported, also hides the bare tqdm bars of libraries
    (transformers' GGUF conversion)."""
    if no_progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
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


Quick = Annotated[bool, typer.Option("--quick", help="apply the config's quick: overrides (a small, fast run)")]


def command_line() -> str:
    """The exact command, written into bench and continual results."""
    return " ".join(["safepatching", *sys.argv[1:]])


ForceMismatch = Annotated[
    bool, typer.Option("--force-mismatch", help="proceed although the model's fingerprint differs from the patch's")
]


ShardSize = Annotated[int, typer.Option(help="output shard size in MB")]
