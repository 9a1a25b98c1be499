"""Real downloaded models (SmolLM2-135M from PyPI): slow, run with `pytest -m slow`."""

import json

import pytest

from safepatching.config.settings import PipelineConfig
from safepatching.experiments.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def test_smollm2_pipeline_end_to_end(tmp_path):
    config = PipelineConfig(
        model="smollm2-135m-instruct",
        output_dir=tmp_path / "run",
        harmful_train={
            "source": "builtin:uncensorbench",
            "split": "train[:16]",
            "shuffle_seed": 0,
            "response_column": "uncensored_response",
        },
        derive={"max_steps": 2, "batch_size": 8, "max_length": 96},
        importance={"max_examples": 8, "batch_size": 8, "max_length": 96},
        eval={"max_examples": 8, "max_new_tokens": 24, "kl_max_new_tokens": 16},
    )
    result = run_pipeline(config, progress=False)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["patched"]["counts"] == {"harmful": 8, "benign": 8, "harmless": 8}
    assert summary["patched"]["kl_to_reference"] > 0
    assert (result.model_dir / "model.safetensors").exists()
    records = [json.loads(line) for line in (tmp_path / "run/eval/backbone/records.jsonl").read_text().splitlines()]
    assert all(r["response"] for r in records if r["set"] == "harmless")  # a real model answers harmless prompts


CONFIGS = __import__("pathlib").Path(__file__).parent.parent / "configs"


def test_shipped_quick_bench_and_continual_run_on_smollm2(tmp_path, run_command):
    """`--quick` of the shipped reference configs: the commands CI can afford on a real model."""

    for command, config, name in (
        ("bench", "bench-reference.yaml", "reference-quick"),
        ("continual", "continual-reference.yaml", "continual-reference-quick"),
    ):
        out, work = tmp_path / command / "results", tmp_path / command / "work"
        completed = run_command(
            command, str(CONFIGS / config), "--quick", "--no-progress",
            "--set", f"output_dir={out}", "--set", f"work_dir={work}",
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        result = json.loads((out / f"{name}.json").read_text())
        assert result["complete"] and result["backbone"] == "smollm2-135m-instruct"
        assert (out / f"{name}.md").read_text().startswith("# ")
    bench = json.loads((tmp_path / "bench/results/reference-quick.json").read_text())
    assert bench["methods"]["safepatching"]["seeds"] == [0, 1] and bench["methods"]["ga"]["seeds"] == [0]
    assert bench["methods"]["ga"]["columns"]["MMLU (%) ↑"]["mean"] is not None
    continual = json.loads((tmp_path / "continual/results/continual-reference-quick.json").read_text())
    assert [r["round"] for r in continual["methods"]["npo"]] == [0, 1, 2, 3]
    assert (tmp_path / "continual/results/continual-reference-quick.png").stat().st_size > 1000
