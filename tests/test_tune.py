"""`safepatching tune` on a tiny model: the study, its resumption, the front, the outputs, bad input."""

import json

import optuna
import pytest
import yaml

from safepatching.config.experiments import SearchRange, TuneConfig
from safepatching.config.loading import build_config
from safepatching.config.settings import PipelineConfig
from safepatching.experiments import tune as tune_module
from safepatching.experiments.tune import distribution, grid_points, queue_grid_point, requeue_interrupted, run_tune


def tune_settings(pipeline, model_dir, root, **tune):
    return {
        "name": "tiny-tune-0.5b",  # a dot in the name: the files are NAME.md, not tiny-tune-0.md
        "pipeline": pipeline(model_dir),
        "validation": {
            "harmful": {"unc-val": {"source": "builtin:uncensorbench", "split": "train[6:12]", "shuffle_seed": 0}},
            "benign": {"scary-val": {"source": "builtin:benign-but-scary", "split": "train[5:9]"}},
            "harmless": {"source": "builtin:harmless", "split": "train[2:4]"},
        },
        "tune": {
            "trials": 3,
            "seed": 7,
            "space": {
                "merge.alpha": {"low": 0.5, "high": 2.0},
                "merge.beta": {"low": 0.0, "high": 3.0},
                "merge.top_a": {"choices": [10, 30]},
                "derive.max_steps": {"choices": [1, 2]},  # a training knob: patches per distinct value
            },
            "max_kl": 50.0,
            "max_looping": 100.0,
            "screen_max_new_tokens": 3,
            "final_max_new_tokens": 5,
            **tune,
        },
        "output_dir": str(root / "results"),
        "work_dir": str(root / "work"),
    }


def front_of(result):
    return [(p["trial"], p["params"], p["screen"]["harmful"], p["screen"]["benign"]) for p in result["front"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, bench_pipeline):
    root = tmp_path_factory.mktemp("tune")
    config = build_config(overrides=tune_settings(bench_pipeline, tiny_model_dir, root), model=TuneConfig)
    return root, run_tune(config, "safepatching tune tiny.yaml", progress=False)


def test_tune_writes_front_trials_plot_and_a_runnable_chosen_config(uninterrupted):
    root, result = uninterrupted
    assert [row["state"] for row in result["trials"]] == ["complete"] * 3
    assert len({json.dumps(row["params"], sort_keys=True) for row in result["trials"]}) == 3
    for row in result["trials"]:
        assert 0.5 <= row["params"]["merge.alpha"] <= 2.0 and row["params"]["merge.top_a"] in (10, 30)
        assert row["params"]["derive.max_steps"] in (1, 2)
        assert 0 <= row["harmful"] <= 100 and 0 <= row["benign"] <= 100 and row["kl"] > 0
    assert result["front"], "a feasible study has a front"
    for point in result["front"]:  # no trial dominates a front point
        for row in result["trials"]:
            assert not (
                row["harmful"] >= point["screen"]["harmful"]
                and row["benign"] <= point["screen"]["benign"]
                and (row["harmful"], row["benign"]) != (point["screen"]["harmful"], point["screen"]["benign"])
            )
        low, high = point["final"]["harmful"]["ci"]
        assert low <= point["final"]["harmful"]["refusal"] <= high and point["final"]["harmful"]["n"] == 6
        assert 0 <= point["final"]["benign"]["p_vs_backbone"] <= 1
    assert 0 <= result["agreement"]["agreeing_percent"] <= 100 and result["agreement"]["decisions"] > 0
    out = root / "results"
    assert (out / "tiny-tune-0.5b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "tiny-tune-0.5b.md").read_text()
    assert "| backbone |" in markdown and "**chosen**" in markdown
    assert json.loads((out / "tiny-tune-0.5b.json").read_text())["front"] == result["front"]
    chosen = build_config(root / "results/tiny-tune-0.5b.chosen.yaml")  # what `safepatching run` reads
    assert isinstance(chosen, PipelineConfig)
    assert chosen.merge.alpha == result["chosen"]["params"]["merge.alpha"]
    assert chosen.merge.top_a == result["chosen"]["params"]["merge.top_a"]
    assert chosen.derive.max_steps == result["chosen"]["params"]["derive.max_steps"]
    base, points = (
        result["backbone"]["screen"],
        [(p["screen"]["harmful"], p["screen"]["benign"]) for p in result["front"]],
    )
    assert result["separation"]["separates"] == any(h > base["harmful"] and b < base["benign"] for h, b in points)
    assert "Separation (short budget" in markdown
    geometry = result["chosen"]["geometry"]  # how the chosen point's patches and regions relate
    assert -1 <= geometry["cosine"] <= 1 and 0 <= geometry["sign_disagreement"] <= 1
    assert 0 <= geometry["regions"]["overlap_jaccard"] <= 1 and "patch geometry: cos(P_s, P_o)" in markdown
    steps = {row["params"]["derive.max_steps"] for row in result["trials"]}
    own = {2} if 2 in steps else set()  # the config's own setting derives under WORK_DIR/patches
    assert len(list((root / "work/sweep").glob("*/patches/safety"))) == len(steps - own)


def test_an_interrupted_study_resumes_to_the_same_front_and_trials_add_on(
    tmp_path, tiny_model_dir, uninterrupted, monkeypatch, bench_pipeline
):
    _, expected = uninterrupted
    config = build_config(overrides=tune_settings(bench_pipeline, tiny_model_dir, tmp_path), model=TuneConfig)
    real_score, calls = tune_module.Tuner.score, []

    def interrupted_score(self, trial):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed mid-trial: the trial stays RUNNING in the database
        return real_score(self, trial)

    monkeypatch.setattr(tune_module.Tuner, "score", interrupted_score)
    with pytest.raises(KeyboardInterrupt):
        run_tune(config, progress=False)
    monkeypatch.setattr(tune_module.Tuner, "score", real_score)
    resumed = run_tune(config, progress=False)
    states = [row["state"] for row in resumed["trials"]]
    assert states.count("complete") == 3 and states.count("interrupted") == 1
    same = [(r["params"], r["harmful"], r["benign"]) for r in resumed["trials"] if r["state"] == "complete"]
    assert same == [(r["params"], r["harmful"], r["benign"]) for r in expected["trials"]]
    assert [p["params"] for p in resumed["front"]] == [p["params"] for p in expected["front"]]

    more = run_tune(config, trials=1, progress=False)
    assert [row["state"] for row in more["trials"]].count("complete") == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tune": {"space": {"merge.alpha": {"low": 2, "high": 1}}}}, "empty or inverted"),
        ({"tune": {"space": {"merge.gamma": {"low": 0, "high": 1}}}}, "unknown setting 'merge.gamma'"),
        ({"tune": {"space": {"eval.max_new_tokens": {"low": 1, "high": 9}}}}, "unknown knob"),
        ({"tune": {"space": {"merge.top_a": {"low": 1, "high": 200}}}}, "less than or equal to 100"),
        ({"tune": {"max_kl": 0}}, "tune.max_kl"),
        ({"tune": {"sampler": "grid"}}, "sampler grid cannot enumerate merge.alpha"),
        (
            {"validation": {"benign": {"overlap": {"source": "builtin:benign-but-scary", "split": "train[1:4]"}}}},
            "reported benign set",
        ),
    ],
)
def test_tune_refuses_bad_input_in_one_line(tmp_path, tiny_model_dir, run_command, bench_pipeline, change, message):
    settings = tune_settings(bench_pipeline, tiny_model_dir, tmp_path)
    for section, values in change.items():
        settings[section] = {**settings[section], **values}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(settings))
    completed = run_command("tune", str(path), "--no-progress")
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "work/study.sqlite3").exists()


def test_a_study_of_another_config_is_refused_unless_new_study(
    uninterrupted, tiny_model_dir, tmp_path, run_command, bench_pipeline
):
    root, _ = uninterrupted
    settings = tune_settings(bench_pipeline, tiny_model_dir, root)
    settings["tune"]["space"]["merge.retention"] = {"low": 0.2, "high": 1.0}
    settings["tune"]["trials"] = 1
    settings["output_dir"] = str(tmp_path / "results")
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(settings))
    refused = run_command("tune", str(path), "--no-progress")
    assert refused.returncode == 2 and "made by another config or model" in refused.stderr
    assert "--new-study" in refused.stderr
    started = run_command("tune", str(path), "--no-progress", "--new-study")
    assert started.returncode == 0, started.stderr
    assert len(list((root / "work").glob("study-*.sqlite3"))) == 1  # the old study is kept
    assert len(json.loads((tmp_path / "results/tiny-tune-0.5b.json").read_text())["trials"]) == 1


def test_a_study_made_before_later_settings_existed_still_opens(tmp_path, tiny_model_dir, bench_pipeline):
    config = TuneConfig.model_validate(tune_settings(bench_pipeline, tiny_model_dir, tmp_path))
    study = tune_module.open_study(config, new_study=False, compute_dtype="float32")
    study.set_user_attr("fingerprint", tune_module.first_study_key(config))  # as the first studies recorded it
    reopened = tune_module.open_study(config, new_study=False, compute_dtype="float32")
    assert reopened.user_attrs["fingerprint"] == tune_module.study_key(config)
    study.set_user_attr("fingerprint", tune_module.first_study_key(config))
    raw = tune_settings(bench_pipeline, tiny_model_dir, tmp_path)
    raw["pipeline"]["importance"] = {**raw["pipeline"].get("importance", {}), "loss_on": "questions"}
    later = TuneConfig.model_validate(raw)  # uses a setting no first study had: not the same study
    assert tune_module.first_study_key(later) is None
    with pytest.raises(tune_module.ConfigError, match="another config"):
        tune_module.open_study(later, new_study=False, compute_dtype="float32")


def test_a_study_judged_in_another_compute_dtype_is_refused(tmp_path, tiny_model_dir, bench_pipeline):
    config = TuneConfig.model_validate(tune_settings(bench_pipeline, tiny_model_dir, tmp_path))
    made = tune_module.open_study(config, new_study=False, compute_dtype="bfloat16")  # say, on a machine with AMX
    assert made.user_attrs["compute_dtype"] == "bfloat16"
    assert (
        tune_module.open_study(config, new_study=False, compute_dtype="bfloat16").user_attrs["compute_dtype"]
        == "bfloat16"
    )
    with pytest.raises(tune_module.ConfigError, match="judged in bfloat16, but compute_dtype resolves to float32"):
        tune_module.open_study(config, new_study=False, compute_dtype="float32")
    fresh = tune_module.open_study(config, new_study=True, compute_dtype="float32")
    assert fresh.user_attrs["compute_dtype"] == "float32"
    # the setting that continues a study elsewhere names the resolved dtype: the same study
    raw = tune_settings(bench_pipeline, tiny_model_dir, tmp_path)
    raw["pipeline"] = {**raw["pipeline"], "compute_dtype": "float32"}
    pinned = TuneConfig.model_validate(raw)
    assert tune_module.study_key(pinned) == tune_module.study_key(config)
    assert (
        tune_module.open_study(pinned, new_study=False, compute_dtype="float32").user_attrs["compute_dtype"]
        == "float32"
    )


def test_separation_reads_the_front_against_the_backbone():
    base = {"harmful": 50.0, "benign": 40.0}
    front = [{"screen": {"harmful": h, "benign": b}} for h, b in [(60.0, 45.0), (45.0, 30.0), (52.0, 38.0)]]
    assert tune_module.separation(front, base) == {
        "benign_at_no_safety_loss": 38.0,
        "harmful_at_no_benign_rise": 52.0,
        "separates": True,
    }
    assert tune_module.separation(front[:2], base) == {  # one trade-off line: safer costs over-refusal
        "benign_at_no_safety_loss": 45.0,
        "harmful_at_no_benign_rise": 45.0,
        "separates": False,
    }
    assert tune_module.separation([], base)["benign_at_no_safety_loss"] is None


def test_a_grid_study_tries_each_point_once_in_order_and_an_interrupted_one_again_first():
    space = {
        "directional.align_iterations": SearchRange(low=1, high=3, integer=True),
        "merge.top_a": SearchRange(choices=[10, 30]),
    }
    points = grid_points(space)
    assert points[:3] == [
        {"directional.align_iterations": 1, "merge.top_a": 10},
        {"directional.align_iterations": 1, "merge.top_a": 30},
        {"directional.align_iterations": 2, "merge.top_a": 10},
    ]
    assert len(points) == 6
    study = optuna.create_study(directions=["maximize", "minimize"])
    distributions = {knob: distribution(search) for knob, search in space.items()}
    tried = []
    assert queue_grid_point(study, space)
    killed = study.ask(distributions)  # left running, as a killed run leaves it
    assert requeue_interrupted(study) == 1
    while queue_grid_point(study, space):
        trial = study.ask(distributions)
        tried.append(trial.params)
        study.tell(trial, [0.0, 0.0])
    assert tried == points and killed.params == points[0]
