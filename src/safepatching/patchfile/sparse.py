"""Portable sparse patches: only the entries a merge changed, bound to their base by a fingerprint.

A patch is a folder with ``patch.safetensors`` and ``patch.json``. For every changed tensor it
stores the flat indices of changed entries and their deltas in the base's dtype; entries whose
delta does not round-trip exactly (``base + delta == patched`` and ``patched - delta == base``,
bit for bit, in that dtype) are stored as exact before/after values instead. So apply and revert
are bit-exact, and a patch costs about two values per changed entry.

The fingerprint of a model is a hash over every stored tensor's name, dtype, shape and content
hash. Applying or reverting checks it (and each touched tensor's own hash) and refuses a
mismatch unless forced; with force, deltas are added to whatever values the model has.
Several patches apply in order in one streaming pass, each checked against the state the
previous ones produced, as in continual PSA.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safepatching import __version__
from safepatching.errors import SafePatchingError
from safepatching.method.dense import is_dense_patch
from safepatching.method.geometry import region_geometry
from safepatching.patchfile.low_rank import (
    Factors,
    RevertSteps,
    apply_low_rank,
    bit_pattern,
    low_rank_change,
    revert_low_rank,
)
from safepatching.storage.files import EDIT_FACTORS_FILE, atomic_dir, load_factors, read_json, save_tensors, write_json
from safepatching.storage.shards import (
    DTYPE_CODES,
    SETTINGS_FILE,
    LazyTensors,
    PlannedTensor,
    WeightFolder,
    copy_model_files,
    read_ahead,
    tensor_digest,
    write_shards,
)

PATCH_FORMAT = "safepatching-sparse-patch"
PATCH_FORMAT_VERSION = 1
LOW_RANK_FORMAT_VERSION = 3  # low-rank entries with revert steps; 2: without steps (still read)
VALUES_FILE = "patch.safetensors"
META_FILE = "patch.json"
INT32_LIMIT = 2**31 - 1


class PatchMismatchError(SafePatchingError):
    """A patch does not fit the model it is applied to or reverted from."""


@dataclass
class SparseDelta:
    """The changed entries of one tensor: arithmetic deltas plus exact before/after exceptions."""

    index: torch.Tensor
    delta: torch.Tensor
    exact_index: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    factors: Factors | None = None  # a low-rank change (then index and delta are empty)
    revert_steps: RevertSteps | None = None  # its ambiguous entries' steps (low_rank.py; None: format 2)

    @property
    def changed(self) -> int:
        return self.index.numel() + self.exact_index.numel()


def diff_tensor(before: torch.Tensor, after: torch.Tensor) -> SparseDelta | None:
    """The sparse difference of two same-shaped tensors, or None when they are bitwise equal."""
    flat_before, flat_after = before.reshape(-1), after.reshape(-1)
    changed = torch.nonzero(bit_pattern(flat_before) != bit_pattern(flat_after)).reshape(-1)
    if changed.numel() == 0:
        return None
    index_dtype = torch.int32 if flat_before.numel() <= INT32_LIMIT else torch.int64
    old, new = flat_before[changed], flat_after[changed]
    if before.is_floating_point():
        delta = (new.double() - old.double()).to(before.dtype)
        exact = (bit_pattern(old + delta) != bit_pattern(new)) | (bit_pattern(new - delta) != bit_pattern(old))
    else:
        delta = torch.zeros_like(new)
        exact = torch.ones_like(changed, dtype=torch.bool)
    return SparseDelta(
        changed[~exact].to(index_dtype),
        delta[~exact],
        changed[exact].to(index_dtype),
        old[exact],
        new[exact],
    )


def diff_low_rank(before: torch.Tensor, after: torch.Tensor, factors: Factors) -> SparseDelta:
    """A low-rank change: its factors, its revert steps and the entries they do not reproduce exactly,
    kept as before/after values; checked by reverting it."""
    steps, changed = low_rank_change(before, after, factors)
    index_dtype = torch.int32 if before.numel() <= INT32_LIMIT else torch.int64
    flat_before, flat_after = before.reshape(-1), after.reshape(-1)
    empty = torch.empty(0, dtype=index_dtype)
    difference = SparseDelta(empty, torch.empty(0, dtype=before.dtype), changed.to(index_dtype),
                             flat_before[changed], flat_after[changed], factors, steps)  # fmt: skip
    if not torch.equal(bit_pattern(apply_delta(after.clone(), difference, -1)), bit_pattern(before)):
        raise PatchMismatchError("a low-rank change does not revert exactly.", "report this as a bug")
    return difference


def apply_delta(values: torch.Tensor, sparse: SparseDelta, sign: int = 1) -> torch.Tensor:
    """Add (sign 1) or subtract (sign -1) the patch in place; exact entries take after/before values."""
    if sparse.factors is not None:
        factors, steps = sparse.factors, sparse.revert_steps
        values.copy_(apply_low_rank(values, factors) if sign > 0 else revert_low_rank(values, factors, steps))
    flat = values.view(-1)
    index = sparse.index.long()
    flat[index] = flat[index] + sparse.delta if sign > 0 else flat[index] - sparse.delta
    flat[sparse.exact_index.long()] = sparse.after if sign > 0 else sparse.before
    return values


def model_fingerprint(digests: dict[str, tuple[str, tuple[int, ...], str]]) -> str:
    """One hash over (name, dtype, shape, content hash) of every tensor, in name order."""
    lines = [f"{name}\t{dtype}\t{list(shape)}\t{digest}" for name, (dtype, shape, digest) in sorted(digests.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _digest_entry(value: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    return DTYPE_CODES[value.dtype], tuple(value.shape), tensor_digest(value)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)


# -- export -----------------------------------------------------------------------------------------
def export_patch(
    base_dir: Path,
    patched_dir: Path,
    target: Path,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the sparse difference between a patched model and its base as a patch folder; the
    tensors a directional edit changed (its factors kept in the patched folder) as low-rank entries."""
    base, patched = WeightFolder(base_dir), WeightFolder(patched_dir)
    factors_file = Path(patched_dir) / EDIT_FACTORS_FILE
    factors = load_factors(factors_file) if factors_file.is_file() else {}
    if set(base.tensors) != set(patched.tensors):
        only = sorted(set(base.tensors) ^ set(patched.tensors))[0]
        raise PatchMismatchError(
            f"the two models store different tensors (e.g. {only}).", "export from a model and its own base"
        )
    before_digests, after_digests, records, sparse = {}, {}, {}, {}
    with _bar(base.total_bytes(), "export patch", progress) as bar:
        for name, info in base.tensors.items():
            old, new = base.read(name), patched.read(name)
            if old.dtype != new.dtype or old.shape != new.shape:
                raise PatchMismatchError(
                    f"{name} is {old.dtype} {tuple(old.shape)} in the base but {new.dtype} {tuple(new.shape)} "
                    "in the patched model.",
                    "export from a model stored in the base's dtype, or re-merge with merge.output_dtype: auto",
                )
            before_digests[name] = _digest_entry(old)
            after_digests[name] = _digest_entry(new)
            difference = diff_low_rank(old, new, factors[name]) if name in factors else diff_tensor(old, new)
            if difference is not None:
                sparse[name] = difference
                records[name] = _change_record(old, new, difference, before_digests[name][2], after_digests[name][2])
            bar.update(info.nbytes)
    tensors = {key: value for name, difference in sparse.items() for key, value in _stored(name, difference)}
    meta = {
        "format": PATCH_FORMAT,
        "format_version": LOW_RANK_FORMAT_VERSION if factors else PATCH_FORMAT_VERSION,
        "safepatching": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": {"fingerprint": model_fingerprint(before_digests), "tensors": len(before_digests)},
        "result_fingerprint": model_fingerprint(after_digests),
        "changed_entries": sum(r["changed"] for r in records.values()),
        "model_entries": sum(info.numel for info in base.tensors.values()),
        "model_bytes": base.total_bytes(),
        "provenance": provenance or {},
        "tensors": records,
    }
    with atomic_dir(target, overwrite=overwrite) as staging:
        save_tensors(staging / VALUES_FILE, tensors)
        meta["patch_bytes"] = (staging / VALUES_FILE).stat().st_size
        write_json(staging / META_FILE, meta)
    return meta


def _change_record(
    old: torch.Tensor, new: torch.Tensor, difference: SparseDelta, before: str, after: str
) -> dict[str, Any]:
    """The metadata of one changed tensor: its dtype and shape, its digests ``before`` and ``after``,
    and the size of the change (in full, from the factors, for a low-rank entry)."""
    record = {
        "dtype": DTYPE_CODES[old.dtype],
        "shape": list(old.shape),
        "changed": difference.changed,
        "exact": difference.exact_index.numel(),
        "before": before,
        "after": after,
    }
    if difference.factors is None:
        where = torch.cat([difference.index.long(), difference.exact_index.long()])
        change = new.reshape(-1)[where].double() - old.reshape(-1)[where].double()
        record.update(
            delta_l2=float(change.norm()) if where.numel() else 0.0,
            delta_max_abs=float(change.abs().max()) if where.numel() else 0.0,
        )
    else:
        full = (new.double() - old.double()).reshape(-1)
        record.update(
            changed=int(torch.count_nonzero(full)),
            delta_l2=float(full.norm()),
            delta_max_abs=float(full.abs().max()),
            low_rank=int(difference.factors[0].shape[0]),
            revert_steps=difference.revert_steps[0].numel(),
        )
    return record


def _stored(name: str, difference: SparseDelta) -> list[tuple[str, torch.Tensor]]:
    """One changed tensor's entries in the values file, under its name."""
    stored = [(f"{name}/index", difference.index), (f"{name}/delta", difference.delta)]
    if difference.exact_index.numel():
        stored += [
            (f"{name}/exact_index", difference.exact_index),
            (f"{name}/before", difference.before),
            (f"{name}/after", difference.after),
        ]
    if difference.factors is not None:
        (rows, columns), (revert, far) = difference.factors, difference.revert_steps
        stored += [
            (f"{name}/low_rank_rows", rows),
            (f"{name}/low_rank_columns", columns),
            (f"{name}/revert_steps", revert),
            (f"{name}/far_steps", far),
        ]
    return stored


# -- reading ----------------------------------------------------------------------------------------
@dataclass
class SparsePatch:
    """A patch folder opened for use: metadata plus lazily read per-tensor deltas."""

    path: Path
    meta: dict[str, Any]
    values: LazyTensors

    def sparse(self, name: str) -> SparseDelta:
        dtype = self.values.infos[f"{name}/delta"].dtype
        empty_index = torch.empty(0, dtype=torch.int64)
        exact = f"{name}/exact_index" in self.values.infos
        low_rank = f"{name}/low_rank_rows" in self.values.infos
        return SparseDelta(
            self.values[f"{name}/index"],
            self.values[f"{name}/delta"],
            self.values[f"{name}/exact_index"] if exact else empty_index,
            self.values[f"{name}/before"] if exact else torch.empty(0, dtype=dtype),
            self.values[f"{name}/after"] if exact else torch.empty(0, dtype=dtype),
            (self.values[f"{name}/low_rank_rows"], self.values[f"{name}/low_rank_columns"]) if low_rank else None,
            (self.values[f"{name}/revert_steps"], self.values[f"{name}/far_steps"])
            if f"{name}/revert_steps" in self.values.infos
            else None,
        )


def open_patch(path: Path) -> SparsePatch:
    path = Path(path)
    if not path.is_dir():
        raise SafePatchingError(f"patch {path} does not exist.", "pass a folder written by `safepatching export`")
    if is_dense_patch(path):
        raise SafePatchingError(
            f"{path} is a derived dense patch (what `derive` writes), not a portable patch file.",
            "merge it with `safepatching merge`, then `safepatching export` the merged model as a patch file",
        )
    if not (path / META_FILE).is_file():
        raise SafePatchingError(
            f"{path} is not a portable patch file (it has no {META_FILE}).",
            "pass a folder written by `safepatching export`",
        )
    meta = read_json(path / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != PATCH_FORMAT:
        raise SafePatchingError(
            f"{path} is not a portable patch file.", "pass a folder written by `safepatching export`"
        )
    if meta.get("format_version", 0) > LOW_RANK_FORMAT_VERSION:
        raise SafePatchingError(
            f"{path} uses patch format {meta['format_version']}, newer than this safepatching understands.",
            "upgrade safepatching",
        )
    values = LazyTensors(path / VALUES_FILE)
    for name in meta["tensors"]:
        if f"{name}/index" not in values.infos or f"{name}/delta" not in values.infos:
            raise SafePatchingError(f"{path} is corrupted: no values for {name}.", "export the patch again")
    return SparsePatch(path, meta, values)


# -- apply and revert -------------------------------------------------------------------------------
def _check_layout(patch: SparsePatch, model: WeightFolder, force: bool) -> None:
    """Touched tensors must exist with the recorded dtype and shape; this is never forced away."""
    for name, record in patch.meta["tensors"].items():
        info = model.tensors.get(name)
        if info is None:
            raise PatchMismatchError(
                f"{patch.path} changes tensor {name}, which the model does not have.",
                "apply the patch to the model architecture it was made for",
            )
        if list(info.shape) != record["shape"] or DTYPE_CODES[info.dtype] != record["dtype"]:
            raise PatchMismatchError(
                f"{patch.path} expects {name} as {record['dtype']} {record['shape']} but the model has "
                f"{DTYPE_CODES[info.dtype]} {list(info.shape)}.",
                "apply the patch to the model it was made for (same architecture and dtype)",
            )
    if not force and len(model.tensors) != patch.meta["base"]["tensors"]:
        raise PatchMismatchError(
            f"the model has {len(model.tensors)} tensors but {patch.path} was made for one with "
            f"{patch.meta['base']['tensors']}.",
            "apply the patch to its base model, or pass --force-mismatch",
        )


@dataclass(frozen=True)
class StreamOptions:
    """How apply and revert stream: whether to proceed on a fingerprint mismatch, the output shard
    size, whether an existing output may be replaced, and whether to show a progress bar."""

    force: bool = False
    shard_size_mb: int = 2000
    overwrite: bool = False
    progress: bool = True


def _stream(
    patches: list[SparsePatch], model_dir: Path, target: Path, sign: int, options: StreamOptions
) -> dict[str, Any]:
    """One pass over the model applying (sign 1) or reverting (sign -1) patches in order."""
    model = WeightFolder(model_dir)
    expect_key, result_key = ("before", "after") if sign > 0 else ("after", "before")
    expect_fp, result_fp = ("base", "result") if sign > 0 else ("result", "base")
    for patch in patches:
        _check_layout(patch, model, options.force)
    stage_digests: list[dict[str, tuple[str, tuple[int, ...], str]]] = [{} for _ in range(len(patches) + 1)]
    remembered = model.remembered_digests()  # the input's hashes from an earlier pass over the same files
    tensors = read_ahead(model, list(model.tensors), (lambda value: None) if remembered else _digest_entry)

    def produce(planned: PlannedTensor) -> torch.Tensor:
        name, value, digest = next(tensors)
        if remembered:
            dtype, shape, content = remembered[name]  # read back from JSON: the shape is a list
            digest = (dtype, tuple(shape), content)
        stage_digests[0][name] = digest
        for k, patch in enumerate(patches):
            record = patch.meta["tensors"].get(name)
            if record is None:
                stage_digests[k + 1][name] = stage_digests[k][name]
                continue
            matches = stage_digests[k][name][2] == record[expect_key]
            if not matches and not options.force:
                raise PatchMismatchError(
                    f"{name} in the model differs from the one {patch.path} was made for.",
                    "use the patch's own base model (see `safepatching inspect`), or pass --force-mismatch",
                )
            apply_delta(value, patch.sparse(name), sign)
            # export verified that the patch maps the recorded input exactly onto the recorded output
            stage_digests[k + 1][name] = (
                (record["dtype"], tuple(record["shape"]), record[result_key]) if matches else _digest_entry(value)
            )
        return value

    plan = [PlannedTensor(name, info.dtype, info.shape) for name, info in model.tensors.items()]
    desc = "apply patches" if sign > 0 else "revert patch"
    with (
        atomic_dir(target, overwrite=options.overwrite) as staging,
        _bar(model.total_bytes(), desc, options.progress) as bar,
    ):
        write_shards(staging, plan, produce, options.shard_size_mb * 1024 * 1024, progress=bar.update)
        for k, patch in enumerate(patches):
            expected = _fingerprint_of(patch, expect_fp)
            if model_fingerprint(stage_digests[k]) != expected and not options.force:
                raise PatchMismatchError(
                    f"the model's fingerprint does not match the one {patch.path} was made for.",
                    "use the patch's own base model (see `safepatching inspect`), or pass --force-mismatch",
                )
        copy_model_files(model.folder, staging, skip=())
        if remembered is None:
            model.remember_digests(stage_digests[0])
        record = {
            "operation": "apply" if sign > 0 else "revert",
            "patches": [str(p.path) for p in patches],
            "input_fingerprint": model_fingerprint(stage_digests[0]),
            "output_fingerprint": model_fingerprint(stage_digests[-1]),
            "matches_patch": all(
                model_fingerprint(stage_digests[k + 1]) == _fingerprint_of(p, result_fp) for k, p in enumerate(patches)
            ),
            "forced": options.force,
        }
        write_json(staging / "safepatching-patches.json", record)
    return record


def _fingerprint_of(patch: SparsePatch, which: str) -> str:
    return patch.meta["base"]["fingerprint"] if which == "base" else patch.meta["result_fingerprint"]


def apply_patches(
    patch_dirs: Iterable[Path],
    base_dir: Path,
    target: Path,
    force: bool = False,
    shard_size_mb: int = 2000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply patches in order to a base model folder, streaming into a new model folder."""
    patches = [open_patch(p) for p in patch_dirs]
    if not patches:
        raise SafePatchingError("no patch given.", "pass one or more patch folders")
    return _stream(patches, base_dir, target, 1, StreamOptions(force, shard_size_mb, overwrite, progress))


def revert_patch(patch_dir: Path, model_dir: Path, target: Path, *options: Any, **named: Any) -> dict[str, Any]:
    """Undo a patch exactly (bit for bit on the entries it touched), streaming into a new folder;
    ``options`` are those of ``apply_patches`` (force, shard_size_mb, overwrite, progress)."""
    return _stream([open_patch(patch_dir)], model_dir, target, -1, StreamOptions(*options, **named))


# -- inspect ----------------------------------------------------------------------------------------
LAYER_PATTERN = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def inspect_patch(patch_dir: Path) -> dict[str, Any]:
    """What a patch changes: totals, and changed entries and delta norms per layer and per module."""
    patch = open_patch(patch_dir)
    meta = patch.meta
    by_layer: dict[str, dict[str, float]] = defaultdict(lambda: {"changed": 0, "entries": 0, "delta_sq": 0.0})
    by_module: dict[str, dict[str, float]] = defaultdict(lambda: {"changed": 0, "entries": 0, "delta_sq": 0.0})
    for name, record in meta["tensors"].items():
        match = LAYER_PATTERN.search(name)
        layer = match.group(1) if match else "-"
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else name
        for group, key in ((by_layer, layer), (by_module, module)):
            group[key]["changed"] += record["changed"]
            group[key]["entries"] += math.prod(record["shape"])
            group[key]["delta_sq"] += record["delta_l2"] ** 2

    def rows(groups: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
        return [
            {
                "name": key,
                "changed": int(value["changed"]),
                "changed_fraction": value["changed"] / max(value["entries"], 1),
                "delta_l2": math.sqrt(value["delta_sq"]),
            }
            for key, value in sorted(
                groups.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0])
            )
        ]

    provenance = meta.get("provenance", {})
    geometry = None
    if "geometry" in provenance:  # a SafePatching merge: how its two patches related
        geometry = {**provenance["geometry"], "regions": region_geometry(provenance.get("merge_counts", {}))}
    return {
        "patch": str(patch.path),
        "base_fingerprint": meta["base"]["fingerprint"],
        "result_fingerprint": meta["result_fingerprint"],
        "changed_entries": meta["changed_entries"],
        "changed_fraction_of_model": meta["changed_entries"] / max(meta["model_entries"], 1),
        "patch_bytes": meta["patch_bytes"],
        "size_fraction_of_model": meta["patch_bytes"] / max(meta["model_bytes"], 1),
        "tensors_changed": len(meta["tensors"]),
        "low_rank_tensors": sum("low_rank" in record for record in meta["tensors"].values()),
        "provenance": provenance,
        "geometry": geometry,
        "layers": rows(by_layer),
        "modules": rows(by_module),
    }


def provenance_from_model(patched_dir: Path) -> dict[str, Any]:
    """The settings record a safepatching merge wrote beside the model, if any."""
    path = Path(patched_dir) / SETTINGS_FILE
    return read_json(path) if path.is_file() else {}
