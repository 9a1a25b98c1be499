"""Size of a directional edit's portable patch: low-rank entries against the sparse format.

On one backbone (the reference by default) the ablation edit of the shipped directions (layer
``--layer``, scale 1, lambda 1) is merged alone into a model folder, then exported twice: with its
factors (format 3: factors, one revert step per entry where rounding need not invert, and the
entries no step mends) and, as the peer, without them (format 1: every changed entry stored). The
low-rank patch is then applied to the base and reverted, and both results are compared bit for bit
with the edited model and the base.

Last line: ``ratio: X`` with X = low-rank patch bytes / sparse patch bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from safepatching.config.settings import PipelineConfig
from safepatching.experiments.stages import Stages
from safepatching.method.dense import DensePatch
from safepatching.patchfile.sparse import apply_patches, export_patch, revert_patch
from safepatching.storage.files import EDIT_FACTORS_FILE
from safepatching.storage.shards import WeightFolder


def same_bits(first: WeightFolder, second: WeightFolder) -> bool:
    """Whether two folders store bitwise equal tensors under the same names."""
    if set(first.tensors) != set(second.tensors):
        return False
    return all(torch.equal(first.read(n).view(torch.uint8), second.read(n).view(torch.uint8)) for n in first.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $SAFEPATCHING_DATA_DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        settings = {"model": args.model, "output_dir": root / "run", "merge": {"alpha": 0.0, "beta": 0.0},
                    "directional": {"ablate_scale": 1.0, "ablate_layer": args.layer, "sets": {"drop_held_out": True}}}  # fmt: skip
        if args.data_dir:
            settings["data_dir"] = args.data_dir
        stages = Stages(PipelineConfig.model_validate(settings), progress=False)
        stages.backbone.model()
        nothing = DensePatch({}, {"direction": "none"})
        counts = stages.merge(nothing, nothing, (None, None), root / "edited")
        base = stages.backbone.folder()
        low_rank = export_patch(base, root / "edited", root / "low-rank", progress=False)
        shutil.move(root / "edited" / EDIT_FACTORS_FILE, root / "factors.safetensors")
        sparse = export_patch(base, root / "edited", root / "sparse", progress=False)
        apply_patches([root / "low-rank"], base, root / "applied", progress=False)
        revert_patch(root / "low-rank", root / "applied", root / "reverted", progress=False)
        exact = {
            "apply": same_bits(WeightFolder(root / "applied"), WeightFolder(root / "edited")),
            "revert": same_bits(WeightFolder(root / "reverted"), WeightFolder(base)),
        }
    inexact = sum(r["exact"] for r in low_rank["tensors"].values())
    steps = sum(r.get("revert_steps", 0) for r in low_rank["tensors"].values())
    result = {
        "model": args.model,
        "layer": args.layer,
        "edited_tensors": counts["edited_tensors"],
        "changed_entries": low_rank["changed_entries"],
        "inexact_entries": inexact,
        "inexact_fraction": round(inexact / max(low_rank["changed_entries"], 1), 4),
        "revert_steps": steps,
        "low_rank_patch_bytes": low_rank["patch_bytes"],
        "sparse_patch_bytes": sparse["patch_bytes"],
        "model_bytes": low_rank["model_bytes"],
        "bit_exact": exact,
    }
    print(json.dumps(result, indent=2))
    print(f"ratio: {low_rank['patch_bytes'] / max(sparse['patch_bytes'], 1):.4f}")


if __name__ == "__main__":
    main()
