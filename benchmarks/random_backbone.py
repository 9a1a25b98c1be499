"""Write a randomly initialised copy of a model from its config and tokenizer files alone.

Throughput depends on a model's shapes, not its weights, so a machine that cannot receive the
weights (a lent GPU machine takes at most 64 MiB per call) can still time the real architecture:

    python benchmarks/random_backbone.py CONFIG_AND_TOKENIZER_DIR OUT_DIR

OUT_DIR then loads like any model folder (``--model OUT_DIR``). Replies are noise: use it for
timings only, never for rates. Gzipped files (``tokenizer.json.gz``, as benchmarks/device_prepare.py
packs it to save carried bytes) are unpacked.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with config.json and the tokenizer files")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source), dtype=torch.float32)
    model.save_pretrained(args.out)
    for path in args.source.iterdir():
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as packed, (args.out / path.stem).open("wb") as plain:
                shutil.copyfileobj(packed, plain)
        elif path.name != "config.json":
            shutil.copy(path, args.out / path.name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, random weights")


if __name__ == "__main__":
    main()
