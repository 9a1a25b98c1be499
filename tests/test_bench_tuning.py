"""The tuned bench on a tiny model: each named row searched with the same budget, evaluated at its
chosen point on the test sets, with paired statistics and the fronts figure; bad tuning input."""

import json

import pytest
import torch
import yaml

from safepatching.config.experiments import BenchConfig
from safepatching.config.loading import build_config, parse_overrides
from safepatching.errors import ConfigError
from safepatching.experiments.bench import Bench, run_bench
from safepatching.report.tables import dominance_markdown

SPACES = {
    "safepatching": {"merge.alpha": {"low": 0.5, "high": 2.0}, "merge.top_a": {"choices": [10, 30]}},
    "ga": {"merge.alpha": {"low": 0.2, "high": 1.0}, "derive.max_steps": {"choices": [1]}},
    "rose": {"eval.decoding.rose_weight": {"low": 0.1, "high": 1.0}},
}


@pytest.fixture(scope="module")
def tuned_bench(tuned_bench_config):
    def settings(pipeline, model_dir, root, **tuning):
        methods = ["backbone", "safepatching", "ga", "rose"]
        return tuned_bench_config(pipeline, model_dir, root, "tiny-tuned", methods, SPACES, seed=3, **tuning)

    return settings


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir, bench_pipeline, tuned_bench):
    root = tmp_path_factory.mktemp("tuned-bench")
    config = build_config(overrides=tuned_bench(bench_pipeline, tiny_model_dir, root), model=BenchConfig)
    return root, config, run_bench(config, "safepatching bench tiny-tuned.yaml", progress=False)


def test_every_tuned_row_gets_the_same_budget_and_its_chosen_point_is_what_is_evaluated(tuned):
    root, config, result = tuned
    rows = result["methods"]
    assert list(rows) == ["backbone", "safepatching", "ga", "rose"]
    assert "tuning" not in rows["backbone"]
    for name in ("safepatching", "ga", "rose"):
        tuning = rows[name]["tuning"]
        assert tuning["trials"] == 2, name
        assert tuning["chosen"] is not None and tuning["screened_front"], name
        study = json.loads((root / "results" / f"tiny-tuned-tuning/tiny-tuned-{name}.json").read_text())
        assert study["chosen"]["params"] == tuning["chosen"]["params"]
        assert len(study["front"]) == 1  # the bench re-judges only the chosen point
        assert (root / "work" / f"study-{name}.sqlite3").exists()
    alpha = rows["ga"]["tuning"]["chosen"]["params"]["merge.alpha"]
    assert 0.2 <= alpha <= 1.0
    ga = json.loads((root / "work/cells/ga/seed-0/metrics.json").read_text())
    assert ga["merge_counts"]["changed_fraction"] > 0  # the GA family merged its patch at the chosen alpha
    assert rows["rose"]["columns"]["KL (nats/token) ↓"]["mean"] is None  # a decoding rule: not measured
    weight = rows["rose"]["tuning"]["chosen"]["params"]["eval.decoding.rose_weight"]
    assert 0.1 <= weight <= 1.0


def test_families_share_one_derivation_and_a_training_knob_derives_its_own(tuned):
    root, _, _ = tuned
    assert (root / "work/patches/safety/deltas.safetensors").exists()
    (sweep,) = (root / "work/sweep").iterdir()  # ga's derive.max_steps=1, once for both its trials
    assert (sweep / "patches/safety/deltas.safetensors").exists()
    assert not (sweep / "patches/over_safety").exists()  # beta 0: the shared over-safety patch stands in


def test_tuned_bench_reports_paired_statistics_and_the_fronts_figure(tuned):
    root, _, result = tuned
    rows = [row for row in result["statistics"] if row["set"] == "harmful"]
    assert [row["model"] for row in rows] == ["backbone", "safepatching", "ga", "rose"]
    assert "p_vs_backbone" not in rows[0] and "p_vs_safepatching" not in rows[1]
    assert all(0 <= row["p_vs_backbone"] <= 1 for row in rows[1:])
    assert all(0 <= row["p_vs_safepatching"] <= 1 for row in rows[2:])
    assert all(row["ci_low"] <= row["rate"] <= row["ci_high"] for row in result["statistics"])
    markdown = (root / "results/tiny-tuned.md").read_text()
    assert "## Tuning" in markdown and "## Paired statistics" in markdown and "p vs safepatching" in markdown
    assert "## SafePatching on the test sets" in markdown and "Rows at least as good on both rates" in markdown
    assert (root / "results/tiny-tuned.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_resumes_every_study_and_cell(tuned):
    root, config, result = tuned
    cells = sorted((root / "work/cells").glob("*/seed-0/metrics.json"))
    stamps = [path.stat().st_mtime_ns for path in cells]
    again = run_bench(config, "safepatching bench tiny-tuned.yaml", progress=False)
    assert [path.stat().st_mtime_ns for path in cells] == stamps
    assert again["statistics"] == result["statistics"]
    assert {n: r["tuning"]["chosen"] for n, r in again["methods"].items() if "tuning" in r} == {
        n: r["tuning"]["chosen"] for n, r in result["methods"].items() if "tuning" in r
    }


def test_a_tuned_row_is_evaluated_on_its_studys_model_then_restored_to_the_files(tuned, tmp_path):
    root, config, _ = tuned
    bench = Bench(config, progress=False)
    bench.tune("safepatching", "")  # resumes the study: nothing new is judged
    bench.evaluate_cell("safepatching", 0, tmp_path)  # cached cells are bypassed: this one merges again
    assert bench.working() is bench._scorer.model  # no third copy of the backbone
    weights = dict(bench.working().named_parameters())
    target = next(name for name in weights if name.endswith("q_proj.weight"))
    restored = weights[target]  # in the compute dtype: the float32 base rounded to it
    assert torch.equal(restored, bench.stages.backbone.base_weight(target).to(restored.dtype))
    cached = (root / "work/cells/safepatching/seed-0/records.jsonl").read_text()
    assert (tmp_path / "records.jsonl").read_text() == cached


@pytest.mark.parametrize(
    ("spaces", "message"),
    [
        ({"ties": {"merge.alpha": {"low": 0.1, "high": 1.0}}}, "tuning.spaces.ties: not a row of this bench"),
        ({"backbone": {"merge.alpha": {"low": 0.1, "high": 1.0}}}, "the backbone has nothing to tune"),
        ({"rose": {"merge.alpha": {"low": 0.1, "high": 1.0}}}, "only eval.decoding.* knobs"),
        ({"ga": {"eval.decoding.rose_weight": {"low": 0.1, "high": 1.0}}}, "set merges: false"),
        ({"ga": {"merge.alpha": {"low": 1.0, "high": 0.5}}}, "empty or inverted"),
        ({"ga": {"merge.magic": {"low": 0.1, "high": 1.0}}}, "unknown setting 'merge.magic'"),
        ({"safedecoding": {"eval.decoding.safedecoding_weight": {"low": 1, "high": 3}}}, "safedecoding's expert"),
    ],
)
def test_bad_tuning_is_refused_in_one_line(
    tmp_path, tiny_model_dir, bench_pipeline, run_command, spaces, message, tuned_bench
):
    config = tuned_bench(bench_pipeline, tiny_model_dir, tmp_path)
    config["methods"].append("safedecoding")
    config["tuning"]["spaces"] = spaces
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    completed = run_command("bench", str(path), "--no-progress")
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "work").exists()  # refused before any work


def test_a_bench_narrowed_from_the_command_line_drops_the_spaces_of_rows_it_leaves_out(
    tmp_path, tiny_model_dir, bench_pipeline, tuned_bench
):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(tuned_bench(bench_pipeline, tiny_model_dir, tmp_path)))
    narrowed = ["methods=[backbone, safepatching]", "tuning.spaces.ga=null", "tuning.spaces.rose=null"]
    config = build_config(path, overrides=parse_overrides(narrowed), model=BenchConfig)
    assert list(config.tuning.spaces) == ["safepatching"]
    with pytest.raises(ConfigError, match="tuning.spaces.ga: not a row of this bench"):
        build_config(path, overrides=parse_overrides(narrowed[:1]), model=BenchConfig)


def test_over_safety_data_that_holds_a_validation_prompt_is_refused(tmp_path, tiny_model_dir, bench_pipeline, tuned_bench):
    config = tuned_bench(bench_pipeline, tiny_model_dir, tmp_path)
    config["methods"] = ["backbone", "safepatching-benign-os"]
    config["over_safety"] = {"train": {"source": "builtin:benign-but-scary", "split": "train[7:12]"}}
    config["tuning"]["spaces"] = {"safepatching-benign-os": {"merge.beta": {"low": 0.1, "high": 1.0}}}
    with pytest.raises(Exception, match="over_safety.train"):
        run_bench(build_config(overrides=config, model=BenchConfig), progress=False)


def test_the_test_set_summary_names_rows_at_least_as_good_as_safepatching_on_both_rates():
    def row(set_name, model, rate, p=None):
        return {"set": set_name, "model": model, "rate": rate, "ci_low": rate - 5, "ci_high": rate + 5} | (
            {"p_vs_backbone": p} if p is not None else {}
        )

    harmful = {"backbone": 50.0, "safepatching": 40.0, "ga": 30.0, "ties": 35.0, "rose": 38.0, "dare": 40.0}
    benign = {"backbone": 40.0, "safepatching": 50.0, "ga": 45.0, "ties": 60.0, "rose": 50.0, "dare": 50.0}
    kl = {"backbone": None, "safepatching": 0.01, "ga": 0.005, "ties": 0.001, "rose": None, "dare": 0.002}
    result = {
        "statistics": [row("harmful", m, r, None if m == "backbone" else 0.01) for m, r in harmful.items()]
        + [row("benign", m, r, None if m == "backbone" else 0.02) for m, r in benign.items()],
        "config": {"harmful_label": "hb", "benign_label": "xs"},
        "methods": {name: {"columns": {"KL (nats/token) ↓": {"mean": value}}} for name, value in kl.items()},
    }
    text = "\n".join(dominance_markdown(result))
    assert "hb harmful responses 50.0 % [45.0, 55.0] → 40.0 % [35.0, 45.0] (0.80×, p 0.01)" in text
    assert "xs refusal 40.0 % [35.0, 45.0] → 50.0 % [45.0, 55.0] (1.25×, p 0.02)" in text
    # ga is better on both at lower KL; rose is better on one, equal on the other, KL not measured;
    # ties refuses more benign prompts; dare is equal on both (not better)
    assert "(at equal or lower KL, where measured): ga, rose." in text
    result["methods"]["ga"]["columns"]["KL (nats/token) ↓"]["mean"] = 0.02
    assert "where measured): rose." in "\n".join(dominance_markdown(result))
