"""Cost of a directional patch against SafePatching's own patch derivation, on one backbone.

Both run in this process, one after the other, on the pipeline's defaults:
- directional: activations of the shipped direction sets (the refusal_direction harmful and
  harmless splits and OR-Bench-Hard's train split, about 760 prompts after the evaluation prompts
  are dropped), their directions, and the ablation edit of every residual writer;
- the peer, SafePatching: both patches derived (gradient ascent and descent on the default
  harmful pairs) and both importance scores (SNIP), as `safepatching run` computes them.

Each part's wall time and peak resident memory (all of it, and the part not backed by a file)
come from the stage meter, the model's load apart. Last line: ``ratio: X``
with X = directional time / SafePatching's derive + importance time (the issue asks for <= 0.2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from safepatching.config.settings import PipelineConfig
from safepatching.experiments.stages import Stages
from safepatching.method.directions import configured_edits, projection_deltas, residual_writers
from safepatching.storage.cache import stage_meter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $SAFEPATCHING_DATA_DIR")
    parser.add_argument("--out", type=Path, default=None, help="also write the measurements as JSON here")
    parser.add_argument(
        "--directional-only", action="store_true",
        help="measure the directional part alone (a backbone whose full fine-tuning does not fit); no ratio line",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        settings = {"model": args.model, "output_dir": work, "directional": {"ablate_scale": 1.0, "ablate_layer": 12,
                    "sets": {"drop_held_out": True}}}  # fmt: skip
        if args.data_dir:
            settings["data_dir"] = args.data_dir
        config = PipelineConfig.model_validate(settings)
        stages = Stages(config, progress=False)
        pairs = stages.harmful_pairs()
        meter: dict = {}
        edits = stages.directional()  # the direction sets are read (and checked against the evaluation sets) here
        prompts = sum(len(p) for p in edits.prompts(config.directional.sets).values())

        with stage_meter(meter, "model_load"):  # the compute-dtype copy, read from the float32 weight files
            model, tokenizer = stages.backbone.model()
        with stage_meter(meter, "directional"):
            found = edits.directions(model, tokenizer, config)
            deltas = projection_deltas(
                stages.backbone.base_weight,
                residual_writers(model, config.directional.embedding),
                configured_edits(found, config.directional),
            )
        del deltas
        if not args.directional_only:
            with stage_meter(meter, "safepatching"):
                safety, over_safety = stages.patches.derive(pairs)
                stages.patches.importance(pairs, safety, over_safety)
    directional, peer = meter["directional"], meter.get("safepatching")
    result = {
        "model": args.model,
        "compute_dtype": stages.compute_dtype,
        "direction_prompts": prompts,
        "harmful_pairs": len(pairs),
        "model_load_seconds": meter["model_load"]["wall_seconds"],
        "model_load": meter["model_load"],
        "directional": directional,
        **({"safepatching_derive_and_importance": peer} if peer else {}),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"directional peak RSS GiB: {directional['peak_rss_gib']}")
    if peer:
        print(f"ratio: {directional['wall_seconds'] / max(peer['wall_seconds'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
