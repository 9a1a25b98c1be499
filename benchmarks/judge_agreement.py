"""Agreement of each offline refusal judge with XSTest's human labels.

Scores every judge on ``xstest/model_completions/*.csv`` (``final_label``) for the binary decision
full compliance vs refusal (full or partial). The keyword judges' phrase lists were written looking
only at the gpt4, llama2new and mistralguard completions (mistralguard for the moralising refusals
that never say "I can't"); llama2orig and mistralinstruct are held out and reported separately.
Last line: ``agreement: X``, the best judge's accuracy over all files.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from safepatching.config.settings import EvalConfig, ModelLoading
from safepatching.evaluation.judges.registry import DATA_JUDGES, Judges
from safepatching.evaluation.judges.rules import BUILTIN_JUDGES

DESIGN_FILES = ("gpt4", "llama2new", "mistralguard")


def load_completions(data_dir: Path) -> dict[str, list[dict[str, str]]]:
    folder = data_dir / "xstest" / "model_completions"
    files = sorted(folder.glob("xstest_v2_completions_*.csv"))
    if not files:
        sys.exit(f"error: no xstest completions under {folder}. Fix: pass --data-dir pointing at the data directory")
    return {
        f.stem.removeprefix("xstest_v2_completions_"): list(csv.DictReader(f.open(encoding="utf-8"))) for f in files
    }


def accuracy(judge, rows: list[dict[str, str]]) -> float:
    hits = sum(judge(r["prompt"], r["completion"]).refusal == (r["final_label"] != "1_full_compliance") for r in rows)
    return hits / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("SAFEPATCHING_DATA_DIR"))
    args = parser.parse_args()
    if args.data_dir is None:
        sys.exit("error: no data directory. Fix: pass --data-dir or set SAFEPATCHING_DATA_DIR")
    completions = load_completions(args.data_dir)
    held_out = [name for name in completions if name not in DESIGN_FILES]
    every = [row for rows in completions.values() for row in rows]
    held_rows = [row for name in held_out for row in completions[name]]
    names = [*BUILTIN_JUDGES, *DATA_JUDGES]
    judges = Judges(EvalConfig(), args.data_dir, loading=ModelLoading())
    design_rows = [row for name in DESIGN_FILES for row in completions.get(name, [])]
    header = ["judge", *completions, "design", "held-out", "all"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    overall = {}
    for name in names:
        judge = judges(name)
        cells = [f"{accuracy(judge, rows):.3f}" for rows in completions.values()]
        overall[name] = accuracy(judge, every)
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {accuracy(judge, design_rows):.3f} | {accuracy(judge, held_rows):.3f} | {overall[name]:.3f} |"
        )
    best = max(overall, key=overall.get)
    print(f"design files: {', '.join(DESIGN_FILES)}; held out: {', '.join(held_out)}; rows: {len(every)}")
    print(f"best offline judge: {best}; held-out agreement {accuracy(judges(best), held_rows):.3f}")
    print(f"agreement: {overall[best]:.3f}")


if __name__ == "__main__":
    main()
