"""Real downloaded models (SmolLM2-135M from PyPI): slow, run with `pytest -m slow`."""

import json

import pytest

from safepatching.config import PipelineConfig
from safepatching.pipeline import run_pipeline

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
