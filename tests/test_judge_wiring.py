"""`run`, `sweep` and `tune` reach a model judge with the run's eval.judge_model and loading settings
(a tiny random model judges: what is asserted is that the settings arrive, not the verdicts); a run
or a comparison loads it once for all the models it evaluates, and one that cannot be found is
refused before any work."""

import pytest
import yaml

from safepatching.config.experiments import SweepConfig, TuneConfig
from safepatching.config.loading import build_config
from safepatching.evaluation.judges import registry
from safepatching.experiments.pipeline import run_pipeline
from safepatching.experiments.sweep import run_sweep
from safepatching.experiments.tune import run_tune

VALIDATION_BENIGN = "scary-val=builtin:benign-but-scary@train[5:8]"


@pytest.fixture
def judge_calls(monkeypatch):
    """Every model judge built, as (style, model folder, loading), each still a real judge."""
    calls = []
    real = registry.LLMJudge

    def recording(style, model_path, *, loading):
        calls.append((style, model_path, loading))
        return real(style, model_path, loading=loading, max_new_tokens=2)

    monkeypatch.setattr(registry, "LLMJudge", recording)
    return calls


def judged_pipeline(bench_pipeline, model_dir, out) -> dict:
    # allow_pickle is off by default: seeing it on at the judge shows the run's loading arrived
    settings = bench_pipeline(model_dir, output_dir=str(out), allow_pickle=True, compute_dtype="float32")
    settings["eval"] = {**settings["eval"], "judge": "harmbench-classifier", "judge_model": str(model_dir),
                        "jailbreaks": []}  # fmt: skip
    return settings


def assert_reached(calls, model_dir):
    assert calls, "no model judge was built"
    for style, folder, loading in calls:
        assert style == "harmbench-classifier" and folder == str(model_dir)
        assert loading.allow_pickle and loading.compute_dtype == "float32"


def test_run_reaches_the_model_judge(tmp_path, tiny_model_dir, bench_pipeline, judge_calls):
    settings = judged_pipeline(bench_pipeline, tiny_model_dir, tmp_path / "run")
    run_pipeline(build_config(overrides=settings), progress=False)
    assert_reached(judge_calls, tiny_model_dir)
    assert len(judge_calls) == 1  # loaded once for the backbone's evaluation and the patched model's


def test_a_comparison_loads_the_model_judge_once_for_all_its_models(
    tmp_path, tiny_model_dir, bench_pipeline, judge_calls
):
    from safepatching.experiments.compare import compare_models

    settings = judged_pipeline(bench_pipeline, tiny_model_dir, tmp_path / "run")
    compare_models([str(tiny_model_dir)] * 2, build_config(overrides=settings), tmp_path / "eval", progress=False)
    assert_reached(judge_calls, tiny_model_dir)
    assert len(judge_calls) == 1


def test_sweep_reaches_the_model_judge(tmp_path, tiny_model_dir, bench_pipeline, judge_calls):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(judged_pipeline(bench_pipeline, tiny_model_dir, tmp_path / "run")))
    request = SweepConfig(config=path, data_dir=tmp_path, harmful_split="train[6:9]", benign=[VALIDATION_BENIGN],
                          vary=["merge.beta=0"], max_new_tokens=3)  # fmt: skip
    run_sweep(request)
    assert_reached(judge_calls, tiny_model_dir)


def test_tune_reaches_the_model_judge(tmp_path, tiny_model_dir, bench_pipeline, judge_calls):
    settings = {
        "name": "judged",
        "pipeline": judged_pipeline(bench_pipeline, tiny_model_dir, tmp_path / "run"),
        "validation": {
            "harmful": {"unc-val": {"source": "builtin:uncensorbench", "split": "train[6:9]", "shuffle_seed": 0}},
            "benign": {"scary-val": {"source": "builtin:benign-but-scary", "split": "train[5:8]"}},
        },
        "tune": {"trials": 1, "space": {"merge.alpha": {"low": 0.5, "high": 2.0}}, "max_kl": 50.0,
                 "max_looping": 100.0, "screen_max_new_tokens": 3, "final_max_new_tokens": 3},
        "output_dir": str(tmp_path / "results"),
        "work_dir": str(tmp_path / "work"),
    }  # fmt: skip
    run_tune(build_config(overrides=settings, model=TuneConfig), "safepatching tune judged.yaml", progress=False)
    assert_reached(judge_calls, tiny_model_dir)


def test_sweep_refuses_a_judge_model_it_cannot_find_before_any_work(
    tmp_path, tiny_model_dir, bench_pipeline, monkeypatch
):
    from safepatching.errors import SafePatchingError
    from safepatching.experiments import backbone

    def no_work(*args, **kwargs):
        raise AssertionError("the backbone was loaded: the judge was checked only when the replies were judged")

    monkeypatch.setattr(backbone, "load_model", no_work)

    settings = judged_pipeline(bench_pipeline, tiny_model_dir, tmp_path / "run")
    settings["eval"]["judge_model"] = str(tmp_path / "no-judge")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(settings))
    request = SweepConfig(config=path, data_dir=tmp_path, harmful_split="train[6:9]", benign=[VALIDATION_BENIGN],
                          vary=["merge.beta=0"], max_new_tokens=3)  # fmt: skip
    with pytest.raises(SafePatchingError, match="no-judge does not exist"):
        run_sweep(request)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]  # no run, work or sweep folder
