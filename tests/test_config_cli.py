import json
import subprocess
import sys
from pathlib import Path

import pytest

from safepatching.cli.options import load_cli_config
from safepatching.config.experiments import BenchConfig, ContinualConfig, DirectionsConfig, TuneConfig, config_model_of
from safepatching.config.loading import build_config, parse_overrides
from safepatching.config.settings import PipelineConfig
from safepatching.errors import ConfigError


def test_yaml_and_cli_flags_give_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: some/model\nseed: 3\nmerge:\n  alpha: 0.25\n  top_a: 5\nderive:\n  target_modules: [q_proj]\n"
    )
    from_yaml = build_config(tmp_path / "c.yaml")
    from_flags = load_cli_config(
        None, ["seed=3", "merge.alpha=0.25", "merge.top_a=5", "derive.target_modules=[q_proj]"], {"model": "some/model"}
    )
    from_api = PipelineConfig(
        model="some/model", seed=3, merge={"alpha": 0.25, "top_a": 5}, derive={"target_modules": ["q_proj"]}
    )
    assert from_yaml == from_flags == from_api
    assert from_yaml.merge.alpha == 0.25 and from_yaml.derive.target_modules == ["q_proj"]


def test_flags_override_the_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("merge:\n  alpha: 0.25\n")
    assert load_cli_config(tmp_path / "c.yaml", ["merge.alpha=0.75"], {}).merge.alpha == 0.75


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mergee:\n  alpha: 1\n", "mergee: unknown key"),
        ("merge:\n  retention: 1.5\n", "merge.retention"),
        ("merge:\n  method: magic\n", "unknown merge method"),
        ("derive:\n  learning_rate: -1\n", "derive.learning_rate"),
        ("harmful_train:\n  source: x.csv\n", "response_column"),
        ("harmful_train_extra:\n  - source: x.csv\n", "response_column"),
        ("- a\n- b\n", "mapping"),
        ("merge: [unclosed\n", "not valid YAML"),
        ("extends: missing.yaml\n", "missing.yaml does not exist"),
        ("extends: c.yaml\n", "cycle"),
        ("extends: {a: 1}\n", "a path or a list of paths"),
    ],
)
def test_invalid_configs_are_config_errors(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(tmp_path / "c.yaml")


def test_a_config_extends_others_and_overrides_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text("merge: {alpha: 0.5, beta: 0.5}\nderive: {max_steps: 3}\n")
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts/recipe.yaml").write_text("merge: {beta: 2.0}\nharmful_train_judge: three-way\n")
    (tmp_path / "variant.yaml").write_text("extends: [base.yaml, parts/recipe.yaml]\nmerge: {alpha: 1.5}\n")
    config = build_config(tmp_path / "variant.yaml", overrides={"derive": {"max_steps": 4}})
    assert (config.merge.alpha, config.merge.beta) == (1.5, 2.0)
    assert config.harmful_train_judge == "three-way" and config.derive.max_steps == 4
    (tmp_path / "chained.yaml").write_text("extends: variant.yaml\n")
    assert build_config(tmp_path / "chained.yaml").merge == config.merge


def test_continual_refuses_extra_training_sources(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "rounds:\n  - {source: a.csv, response_column: r}\n"
        "pipeline:\n  harmful_train_extra:\n    - {source: b.csv, response_column: r}\n"
    )
    with pytest.raises(ConfigError, match="takes its harmful pairs from rounds"):
        build_config(tmp_path / "c.yaml", model=ContinualConfig)


def test_override_syntax_errors():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["merge.alpha=[unclosed"])


def test_cli_reports_bad_config_in_one_line_without_traceback(tmp_path, run_command):
    (tmp_path / "c.yaml").write_text("merge:\n  alphaa: 1\n")
    result = run_command("run", str(tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert "merge.alphaa: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_missing_config_file(tmp_path, run_command):
    result = run_command("run", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_cli_config_prints_every_key(run_command):
    result = run_command("config", "--set", "merge.alpha=0.5")
    assert result.returncode == 0
    reparsed = PipelineConfig.model_validate(__import__("yaml").safe_load(result.stdout))
    assert reparsed.merge.alpha == 0.5 and reparsed.merge.retention == PipelineConfig().merge.retention


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tune-1.5b-more-pairs.yaml", TuneConfig),
        ("bench-1.5b.yaml", BenchConfig),
        ("continual-tuned.yaml", ContinualConfig),
    ],
)
def test_cli_config_prints_experiment_configs_resolved(name, kind, run_command):
    path = Path(__file__).parent.parent / "configs" / name
    result = run_command("config", str(path))
    assert result.returncode == 0, result.stderr
    assert kind.model_validate(__import__("yaml").safe_load(result.stdout)) == build_config(path, model=kind)


def test_cli_unknown_model_path_is_a_clear_error(tmp_path, run_command):
    result = run_command("derive", "--direction", "ascent", "--out", str(tmp_path / "p"), "--model", "./nowhere")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_cli_derive_score_merge_end_to_end_and_no_silent_overwrite(tmp_path, tiny_model_dir, run_command):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"How do I do bad thing {i}?", "response": f"Here is how to do bad thing {i}."})
            + "\n"
            for i in range(4)
        )
    )
    common = [
        "--model",
        str(tiny_model_dir),
        "--set",
        "harmful_train.response_column=response",
        "--set",
        "derive.max_steps=1",
        "--set",
        "derive.max_length=48",
    ]
    for direction, name in (("ascent", "safety"), ("descent", "over")):
        result = run_command(
            "derive",
            "--direction",
            direction,
            "--out",
            str(tmp_path / name),
            "--data",
            str(data),
            "--no-progress",
            *common,
        )
        assert result.returncode == 0, result.stderr
        result = run_command(
            "score",
            "--patch",
            str(tmp_path / name),
            "--out",
            str(tmp_path / f"{name}.safetensors"),
            "--data",
            str(data),
            "--no-progress",
            *common,
        )
        assert result.returncode == 0, result.stderr
    merge_args = [
        "merge",
        "--safety-patch",
        str(tmp_path / "safety"),
        "--over-safety-patch",
        str(tmp_path / "over"),
        "--safety-scores",
        str(tmp_path / "safety.safetensors"),
        "--over-safety-scores",
        str(tmp_path / "over.safetensors"),
        "--out",
        str(tmp_path / "model"),
        "--model",
        str(tiny_model_dir),
    ]
    assert run_command(*merge_args).returncode == 0
    assert (tmp_path / "model/model.safetensors").exists()
    again = run_command(*merge_args)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert run_command(*merge_args, "--force").returncode == 0
    rederive = run_command(
        "derive", "--direction", "ascent", "--out", str(tmp_path / "safety"), "--data", str(data), *common
    )
    assert rederive.returncode == 2 and "already exists" in rederive.stderr


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    kinds = {"bench": BenchConfig, "continual": ContinualConfig, "tune": TuneConfig, "directions": DirectionsConfig}
    kind = config_model_of(path)  # the CLI's own way of telling kinds apart, checked against the name
    assert kind is kinds.get(path.name.split("-")[0], PipelineConfig)
    assert isinstance(build_config(path, model=kind), kind)
    if kind in (BenchConfig, ContinualConfig, DirectionsConfig):
        quick = build_config(path, model=kind, quick=True)
        assert quick.name.endswith("-quick") and quick.pipeline.model == "smollm2-135m-instruct"


def test_the_1_5b_tune_config_makes_the_1_5b_bench_safepatching_study():
    from safepatching.experiments.tune import study_key

    configs = Path(__file__).parent.parent / "configs"
    tune = build_config(configs / "tune-1.5b.yaml", model=TuneConfig)
    bench = build_config(configs / "bench-1.5b.yaml", model=BenchConfig).tune_config("safepatching")
    assert (tune.work_dir, tune.study_file) == (bench.work_dir, bench.study_file)
    assert study_key(tune) == study_key(bench)


def test_the_1_5b_more_pairs_study_is_the_1_5b_study_with_the_more_pairs_recipe():
    configs = Path(__file__).parent.parent / "configs"
    recipe_keys = {"harmful_train_extra", "drop_eval_overlap", "harmful_train_judge"}
    study = build_config(configs / "tune-1.5b.yaml", model=TuneConfig).model_dump()
    variant = build_config(configs / "tune-1.5b-more-pairs.yaml", model=TuneConfig).model_dump()
    recipe = build_config(configs / "tune-more-pairs.yaml", model=TuneConfig).model_dump()["pipeline"]
    assert {key: variant["pipeline"][key] for key in recipe_keys} == {key: recipe[key] for key in recipe_keys}
    assert variant["pipeline"]["harmful_train"] == recipe["harmful_train"]
    for config in (study, variant):
        for key in ("name", "work_dir", "study_file"):  # its own study, beside tune-1.5b's
            config.pop(key)
        for key in recipe_keys:
            config["pipeline"].pop(key)
    assert variant == study


def test_usage_errors_are_one_line_and_compare_takes_several_models(tmp_path, run_command):
    result = run_command("eval", "--model", "a", "--bogus-flag")
    assert result.returncode == 2 and "internal error" not in result.stderr and "Traceback" not in result.stderr
    result = run_command(
        "eval", "--compare", str(tmp_path / "first"), str(tmp_path / "second"), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "first" in result.stderr and "does not exist" in result.stderr
    result = run_command("eval", "stray", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "--compare" in result.stderr


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ({"merge": {"alpah": 1}}, "custom_methods.typo.merge.alpah: unknown key"),
        ({"merge": {"retention": 2}}, "custom_methods.typo.merge.retention: Input should be less than or equal to 1"),
        ({"kind": "decoding", "decoding": {"method": "safedecoding"}}, "needs decoding.expert_model"),
    ],
)
def test_bench_method_overrides_are_validated_when_the_config_is_read(method, expected):
    with pytest.raises(ConfigError) as raised:
        build_config(overrides={"custom_methods": {"typo": method}, "methods": ["typo"]}, model=BenchConfig)
    assert expected in str(raised.value)


def test_no_progress_also_hides_the_bare_tqdm_bars_of_libraries():
    """transformers converts GGUF files under a plain tqdm bar that its own switch does not reach."""
    script = ("import sys\nfrom safepatching.cli.options import show_progress\nshow_progress(sys.argv[1] == 'off')\n"
              "from tqdm.auto import tqdm\nlist(tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'))")  # fmt: skip
    hidden = subprocess.run([sys.executable, "-c", script, "off"], capture_output=True, text=True)
    shown = subprocess.run([sys.executable, "-c", script, "on"], capture_output=True, text=True)
    assert hidden.returncode == 0 and "Converting" not in hidden.stderr
    assert "Converting and de-quantizing" in shown.stderr  # the test sees a bar when there is one
