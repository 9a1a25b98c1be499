"""benchmarks/variants.py: the paired comparison matches trials at identical knobs and tests the
changes with a paired t-test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "variants.py"


def study(name: str, rates: list[tuple[float, float]], first_alpha: float = 0.5) -> dict:
    trials = [
        {"trial": i, "state": "complete", "params": {"merge.alpha": first_alpha + i}, "harmful": h, "benign": b}
        for i, (h, b) in enumerate(rates)
    ]
    return {
        "name": name,
        "model": "tiny",
        "trials": trials,
        "front": [],
        "backbone": {"screen": {"harmful": 50.0, "benign": 40.0}},
        "separation": {"separates": False},
        "chosen": None,
    }


def run(tmp_path: Path, *studies: dict, reference: dict) -> dict:
    paths = []
    for result in (*studies, reference):
        paths.append(tmp_path / f"{result['name']}.json")
        paths[-1].write_text(json.dumps(result))
    out = tmp_path / "variants"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, paths[:-1]), "--paired-with", str(paths[-1]), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == f"separates: 0 of {len(studies)}"
    assert "## Paired with" in out.with_suffix(".md").read_text()
    return {row["study"]: row["paired"] for row in json.loads(out.with_suffix(".json").read_text())["variants"]}


def test_variant_changes_are_measured_at_the_reference_trials_knobs(tmp_path):
    reference = study("reference", [(60, 40), (70, 50), (80, 60), (50, 30)])
    better = study("better", [(64, 39), (73, 49), (85, 58), (52, 30), (99, 1)])  # the last knobs: unmatched
    shifted = study("shifted", [(60, 40)] * 3, first_alpha=7.0)  # no knobs in common
    paired = run(tmp_path, better, shifted, reference=reference)
    assert paired["better"]["matched_trials"] == 4
    assert paired["better"]["harmful"]["mean_change"] == pytest.approx(3.5)
    assert paired["better"]["benign"]["mean_change"] == pytest.approx(-1.0)
    separation = paired["better"]["separation"]
    assert separation["mean_change"] == pytest.approx(4.5)
    low, high = separation["ci"]
    assert 0 < low < 4.5 < high and separation["p"] < 0.05
    assert paired["shifted"] == {
        "matched_trials": 0,
        **{k: {"mean_change": None, "ci": None, "p": None} for k in ("harmful", "benign", "separation")},
    }
