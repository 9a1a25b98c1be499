"""Apply a SafePatching patch to the reference backbone and run mergekit's task_arithmetic on the same model.

Both run as subprocesses in this one run, on the same machine and files, alternating, each started
after os.sync() so neither pays for the other's pending writes; wall time (best of --repeats) and
peak RSS (ru_maxrss of each child, worst of the repeats) are measured the same way. mergekit merges base + 1.0 x (patched - base),
which produces the same model our `apply` writes, from the full patched model instead of a patch.
mergekit==0.1.5 is installed only for this benchmark, into its own virtual environment (with
access to the system site packages so torch is shared) in the safepatching cache.

    python benchmarks/apply_vs_mergekit.py --patch PATCH_DIR          # a patch from `safepatching export`
    python benchmarks/apply_vs_mergekit.py --run runs/demo-qwen2.5-coder-0.5b-instruct

Without --patch or --run a synthetic patch is made: 5 % of the entries of every attention and MLP
weight, chosen at random, get a small random change (a SafePatching merge at the default settings
changes about that share). The last line is `time_ratio: X rss_ratio: Y` (ours / mergekit), our time
being that of a repeat apply to the same base files, whose content hashes `apply` remembers (keyed by
each file's size, mtime and inode); the line before it gives the ratio for a base never hashed before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from safepatching.config.settings import ModelLoading, cache_dir
from safepatching.models.loading import weights_folder
from safepatching.storage.shards import PlannedTensor, WeightFolder, copy_model_files, write_shards

MERGEKIT = "mergekit==0.1.5"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(command)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 2**20


def mergekit_environment() -> Path:
    venv = cache_dir() / "mergekit-venv"
    executable = venv / "bin" / "mergekit-yaml"
    if not executable.exists():
        print(f"installing {MERGEKIT} into {venv} (benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", MERGEKIT], check=True)
    return executable


def synthetic_patched_model(base: Path, target: Path, share: float = 0.05, seed: int = 0) -> None:
    folder = WeightFolder(base)
    generator = torch.Generator().manual_seed(seed)

    def produce(planned: PlannedTensor) -> torch.Tensor:
        value = folder.read(planned.name)
        if planned.name.rsplit(".", 2)[-2] in TARGETS and planned.name.endswith(".weight"):
            mask = torch.rand(value.shape, generator=generator) < share
            noise = 1e-3 * torch.randn(value.shape, generator=generator, dtype=torch.float32)
            value = torch.where(mask, value.float() + noise, value.float()).to(value.dtype)
        return value

    target.mkdir(parents=True)
    plan = [PlannedTensor(n, i.dtype, i.shape) for n, i in folder.tensors.items()]
    write_shards(target, plan, produce, 2000 * 2**20)
    copy_model_files(base, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="base model (demo name or folder)")
    parser.add_argument("--patch", type=Path, help="patch folder made for --model")
    parser.add_argument("--run", type=Path, help="a finished run directory to export the patch from")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool; the fastest is reported")
    parser.add_argument("--make-synthetic", nargs=2, type=Path, metavar=("BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_synthetic:
        synthetic_patched_model(*args.make_synthetic)
        return

    base = weights_folder(args.model, loading=ModelLoading())
    executable = mergekit_environment()
    work = Path(tempfile.mkdtemp(prefix="apply-vs-mergekit-", dir=args.workdir))
    try:
        patch, source = args.patch, "given patch"
        # Everything that touches tensors before the timed runs happens in child processes: a child's
        # ru_maxrss starts from its parent's peak (fork/exec keeps it), so this process stays small.
        if patch is None:
            if args.run is not None:
                patched_model, source = args.run / "model", f"patch exported from {args.run}"
            else:
                patched_model, source = work / "synthetic-patched", "synthetic 5 % patch"
                subprocess.run(
                    [sys.executable, __file__, "--make-synthetic", str(base), str(patched_model)], check=True
                )
            patch = work / "patch"
            subprocess.run([sys.executable, "-m", "safepatching", "export", "--model", str(patched_model), "--base",
                            str(base), "--out", str(patch), "--no-progress"], check=True, capture_output=True)  # fmt: skip
        # mergekit needs the full patched model; make it with our apply (not timed).
        full = work / "patched-full"
        subprocess.run([sys.executable, "-m", "safepatching", "apply", str(patch), "--base", str(base), "--out",
                        str(full), "--no-progress"], check=True, capture_output=True)  # fmt: skip
        config = work / "task_arithmetic.yml"
        config.write_text(
            f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {full}\n    parameters:\n      weight: 1.0\ndtype: float32\n"
        )
        ours_cmd = [sys.executable, "-m", "safepatching", "apply", str(patch), "--base", str(base),
                    "--out", str(work / "ours"), "--no-progress"]  # fmt: skip
        theirs_cmd = [str(executable), str(config), str(work / "mergekit")]
        runs: dict[str, list[tuple[float, float]]] = {"ours-first": [], "ours": [], "mergekit": []}
        remembered = WeightFolder(base)._digest_file()
        order = (
            ("ours-first", ours_cmd, work / "ours"),
            ("ours", ours_cmd, work / "ours"),
            ("mergekit", theirs_cmd, work / "mergekit"),
        )
        for _ in range(args.repeats):  # alternate, and start each run with the page cache flushed to disk
            for label, command, out in order:
                shutil.rmtree(out, ignore_errors=True)
                if label == "ours-first":  # as if this base had never been patched here: it is hashed
                    remembered.unlink(missing_ok=True)
                os.sync()
                runs[label].append(timed(command))
        first_time = min(t for t, _ in runs["ours-first"])
        ours_time, ours_rss = min(t for t, _ in runs["ours"]), max(r for _, r in runs["ours"])
        theirs_time, theirs_rss = min(t for t, _ in runs["mergekit"]), max(r for _, r in runs["mergekit"])

        base_weights = WeightFolder(base)
        largest = max(info.nbytes for info in base_weights.tensors.values()) / 2**30
        ours_out, theirs_out = WeightFolder(work / "ours"), WeightFolder(work / "mergekit")
        max_difference = max(
            float((ours_out.read(name).float() - theirs_out.read(name).float()).abs().max())
            for name in ours_out.tensors
            if name in theirs_out.tensors
        )
        patch_bytes = sum(p.stat().st_size for p in Path(patch).iterdir())
        print(f"model: {args.model} ({base_weights.total_bytes() / 2**30:.2f} GiB, largest tensor {largest:.3f} GiB)")
        print(
            f"patch: {source}, {patch_bytes / 2**20:.1f} MiB ({100 * patch_bytes / base_weights.total_bytes():.1f}% of the model)"
        )
        print(
            f"safepatching apply: {ours_time:.1f} s (best of {args.repeats}; the base's hashes remembered from an "
            f"earlier apply), peak RSS {ours_rss:.2f} GiB"
        )
        print(f"safepatching apply to a base not seen before (hashing it): {first_time:.1f} s (best of {args.repeats})")
        print(
            f"mergekit task_arithmetic ({MERGEKIT}): {theirs_time:.1f} s (best of {args.repeats}), peak RSS {theirs_rss:.2f} GiB"
        )
        print(f"max |ours - mergekit| over shared tensors: {max_difference:.3g}")
        print(
            f"our peak RSS within 2 x largest tensor + 1 GiB ({2 * largest + 1:.2f} GiB): {ours_rss <= 2 * largest + 1}"
        )
        print(f"first-apply time_ratio: {first_time / theirs_time:.3f}")
        print(f"time_ratio: {ours_time / theirs_time:.3f} rss_ratio: {ours_rss / theirs_rss:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
