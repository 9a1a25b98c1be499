"""Portable patch commands: export, apply, revert and inspect sparse patch files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safepatching.cli.options import Force, ForceMismatch, NoProgress, ShardSize, err, refuse_existing, show_progress
from safepatching.config.loading import build_config
from safepatching.config.settings import ModelLoading
from safepatching.errors import SafePatchingError


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
    from safepatching.models.loading import weights_folder
    from safepatching.patchfile.sparse import export_patch, provenance_from_model

    if run_dir is not None:
        config = build_config(run_dir / "config.yaml", {})
        model, base = run_dir / "model", base or config.model
    if model is None or base is None:
        raise SafePatchingError(
            "export needs a patched model and its base.", "pass --run RUN_DIR or --model DIR --base MODEL"
        )
    refuse_existing(out, force)
    provenance = {"base_model": base, **provenance_from_model(model)}
    meta = export_patch(weights_folder(base, loading=ModelLoading()), model, out, provenance, overwrite=force, progress=progress)
    err.print(
        f"patch with {meta['changed_entries']:,} changed entries ({meta['patch_bytes'] / 2**20:.1f} MiB, "
        f"{100 * meta['patch_bytes'] / meta['model_bytes']:.1f}% of the model) written to {out}"
    )


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
    from safepatching.patchfile.sparse import apply_patches

    record = stream_patches(apply_patches, patches, base, out, force_mismatch, shard_size_mb, force, no_progress)
    fingerprint = record["output_fingerprint"][:16]
    err.print(f"{len(patches)} patch(es) applied; model written to {out} (fingerprint {fingerprint})")


def revert(
    patch: Annotated[Path, typer.Argument(help="patch folder to undo")],
    model: Annotated[str, typer.Option(help="patched model (folder, demo name or hub id)")],
    out: Annotated[Path, typer.Option(help="model folder to write")],
    force: Force = False,
    no_progress: NoProgress = False,
    force_mismatch: ForceMismatch = False,
    shard_size_mb: ShardSize = 2000,
) -> None:
    """Undo a patch exactly, bit for bit on the entries it touched, into a new model folder."""
    from safepatching.patchfile.sparse import revert_patch

    record = stream_patches(revert_patch, patch, model, out, force_mismatch, shard_size_mb, force, no_progress)
    err.print(f"patch reverted; model written to {out} (fingerprint {record['output_fingerprint'][:16]})")


def stream_patches(operation, patches, model: str, out: Path, force_mismatch, shard_size_mb, force, no_progress):
    """Apply or revert, checked in the order the command line reads (the patches, the model, the
    output) before any work; then the model is streamed."""
    progress = show_progress(no_progress)
    from safepatching.models.loading import weights_folder
    from safepatching.patchfile.sparse import open_patch

    for patch in patches if isinstance(patches, list) else [patches]:
        open_patch(patch)
    refuse_existing(out, force)

    folder = weights_folder(model, loading=ModelLoading())
    return operation(patches, folder, out, force_mismatch, shard_size_mb, overwrite=force, progress=progress)


def inspect(
    patch: Annotated[Path, typer.Argument(help="patch folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Show what a patch changes, per layer and per module."""
    from safepatching.patchfile.sparse import inspect_patch
    from safepatching.report.tables import print_patch_summary

    summary = inspect_patch(patch)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_patch_summary(summary, Console(highlight=False))
