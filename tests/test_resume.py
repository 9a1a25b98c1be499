"""Derivation checkpoints: a run killed with SIGKILL resumes and gives the same patch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from safepatching.method.dense import checkpoint_dir_for, load_dense_patch


def derive_command(model_dir, data, out):
    settings = {
        "harmful_train.response_column": "response",
        "derive.max_steps": 120,
        "derive.batch_size": 1,
        "derive.gradient_accumulation_steps": 2,  # 3 steps per epoch with 6 pairs: epochs roll over
        "derive.learning_rate": 1e-3,
        "derive.max_length": 48,
        "derive.ascent_max_nll_increase": 1000,
        "derive.checkpoint_every_steps": 1,
    }
    flags = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "safepatching", "derive", "--direction", "ascent", "--model", str(model_dir),
            "--data", str(data), "--out", str(out), "--no-progress", *flags]  # fmt: skip


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Bad request {i}?", "response": f"Harmful answer {i}."}) + "\n" for i in range(6)
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(
        derive_command(tiny_model_dir, data, tmp_path / "ref"), capture_output=True, text=True, env=env
    )
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "patch"
    state_file = checkpoint_dir_for(out) / "state.json"
    process = subprocess.Popen(derive_command(tiny_model_dir, data, out), stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 900  # bounds a hang only: a starved CI machine once needed more than 120 s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads(state_file.read_text())["history"]) >= 10:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    assert state_file.exists(), "no checkpoint was written before the deadline"
    saved_steps = len(json.loads(state_file.read_text())["history"])
    assert 10 <= saved_steps < 120

    resumed = subprocess.run(derive_command(tiny_model_dir, data, out), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming derivation" in resumed.stderr
    first, second = load_dense_patch(tmp_path / "ref"), load_dense_patch(out)
    assert first.info["steps"] == second.info["steps"] == 120
    assert first.info["nll_history"] == second.info["nll_history"]
    for name in first.deltas:
        assert torch.equal(first.deltas[name], second.deltas[name]), name
    assert not checkpoint_dir_for(out).exists()
