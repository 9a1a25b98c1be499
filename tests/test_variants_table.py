"""benchmarks/variants.py: the paired comparison matches trials at identical knobs and tests the
changes with a paired t-test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "variants.py"


def study(name: str, rates: list[tuple[float, float]], first_alpha: float = 0.5, model: str = "tiny") -> dict:
    trials = [
        {"trial": i, "state": "complete", "params": {"merge.alpha": first_alpha + i}, "harmful": h, "benign": b}
        for i, (h, b) in enumerate(rates)
    ]
    return {
        "name": name,
        "model": model,
        "compute_dtype": "float32",
        "trials": trials,
        "front": [],
        "backbone": {"screen": {"harmful": 50.0, "benign": 40.0}},
        "separation": {"separates": False},
        "chosen": None,
    }


def written(tmp_path: Path, *results: dict) -> list[Path]:
    """Each study's JSON, written where the script reads it."""
    paths = [tmp_path / f"{result['name']}.json" for result in results]
    for path, result in zip(paths, results, strict=True):
        path.write_text(json.dumps(result))
    return paths


def run(tmp_path: Path, *studies: dict, references: list[dict]) -> dict:
    paths = written(tmp_path, *studies, *references)
    out = tmp_path / "variants"
    studied, referenced = paths[: len(studies)], paths[len(studies) :]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, studied), "--paired-with", *map(str, referenced), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == f"separates: 0 of {len(studies)}"
    assert "## Paired with the reference study of the same backbone" in out.with_suffix(".md").read_text()
    return {row["study"]: row["paired"] for row in json.loads(out.with_suffix(".json").read_text())["variants"]}


def test_variant_changes_are_measured_at_the_reference_trials_knobs(tmp_path):
    reference = study("reference", [(60, 40), (70, 50), (80, 60), (50, 30)])
    better = study("better", [(64, 39), (73, 49), (85, 58), (52, 30), (99, 1)])  # the last knobs: unmatched
    shifted = study("shifted", [(60, 40)] * 3, first_alpha=7.0)  # no knobs in common
    paired = run(tmp_path, better, shifted, references=[reference])
    assert paired["better"]["matched_trials"] == 4
    assert paired["better"]["harmful"]["mean_change"] == pytest.approx(3.5)
    assert paired["better"]["benign"]["mean_change"] == pytest.approx(-1.0)
    separation = paired["better"]["separation"]
    assert separation["mean_change"] == pytest.approx(4.5)
    low, high = separation["ci"]
    assert 0 < low < 4.5 < high and separation["p"] < 0.05
    assert paired["shifted"] == {
        "reference": str(tmp_path / "reference.json"),
        "matched_trials": 0,
        **{k: {"mean_change": None, "ci": None, "p": None} for k in ("harmful", "benign", "separation")},
    }


def test_each_variant_is_paired_with_the_reference_of_its_own_backbone(tmp_path):
    small = study("small", [(60, 40), (70, 50)])
    large = study("large", [(80, 20), (90, 30)], model="large")
    large_variant = study("large-variant", [(70, 10), (80, 20)], model="large")  # knobs shared with both
    orphan = study("orphan", [(60, 40)], model="unreferenced")
    paired = run(tmp_path, large_variant, orphan, references=[small, large])
    assert paired["large-variant"]["reference"] == str(tmp_path / "large.json")
    assert paired["large-variant"]["harmful"]["mean_change"] == pytest.approx(-10.0)
    assert paired["large-variant"]["benign"]["mean_change"] == pytest.approx(-10.0)
    assert paired["orphan"] is None
    assert "| orphan | none of this backbone and dtype | 0 |" in (tmp_path / "variants.md").read_text()


def test_two_references_for_one_backbone_are_refused(tmp_path):
    paths = written(tmp_path, study("first", [(60, 40)]), study("second", [(60, 40)]))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(paths[0]), "--paired-with", *map(str, paths), "--out", str(tmp_path / "v")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert done.stderr.strip() == "error: two references for tiny (float32): give one per backbone"
