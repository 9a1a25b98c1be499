"""One command at a time per output directory: a second one is refused in one line, a lock whose
process is gone is taken over."""

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from safepatching.storage.lock import LOCK_NAME, DirectoryInUseError, directory_lock

HOLD = "import sys, time; from safepatching.storage.lock import directory_lock\n" \
       "with directory_lock(sys.argv[1], 'holder command'):\n    print('held', flush=True); time.sleep(60)"  # fmt: skip


def run_config(tiny_pipeline_config, model_dir, out, path):
    config = tiny_pipeline_config(model_dir, out)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


# the first run holds its lock until the test says go, so the second always meets a held lock
PAUSED_RUN = """import sys
from contextlib import contextmanager
from safepatching.experiments import pipeline
from safepatching.cli import main
real_lock = pipeline.directory_lock
@contextmanager
def paused_lock(*args, **kwargs):
    with real_lock(*args, **kwargs):
        print('held', flush=True)
        sys.stdin.readline()
        yield
pipeline.directory_lock = paused_lock
sys.argv[0] = 'safepatching'
main()"""


def test_two_runs_on_one_directory(tmp_path, tiny_model_dir, tiny_pipeline_config):
    out = tmp_path / "run"
    path = run_config(tiny_pipeline_config, tiny_model_dir, out, tmp_path / "config.yaml")
    args = ["run", str(path), "--no-progress"]
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "safepatching", *args], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
    finally:
        _, first_err = first.communicate("go\n", timeout=600)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "Traceback" not in second.stderr
    message = second.stderr.strip()
    assert len(message.splitlines()) == 1 and f"in use by PID {first.pid}" in message
    assert f"safepatching run {path}" in message
    assert not (out / LOCK_NAME).exists()  # released when the first run finished
    assert (out / "model" / "config.json").exists()


def test_a_refused_command_writes_nothing(tmp_path, tiny_model_dir, tiny_pipeline_config):
    out = tmp_path / "run"
    path = run_config(tiny_pipeline_config, tiny_model_dir, out, tmp_path / "config.yaml")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = subprocess.run([sys.executable, "-m", "safepatching", "run", str(path)], capture_output=True,
                                 text=True)  # fmt: skip
        assert refused.returncode == 2 and f"PID {holder.pid} (holder command" in refused.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        with pytest.raises(DirectoryInUseError, match="in use"), directory_lock(out):  # the Python API too
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "command": "safepatching bench old.yaml"}))
    with caplog.at_level(logging.WARNING), directory_lock(tmp_path, "new command"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with directory_lock(tmp_path):  # the holder may take it again (a bench's own studies)
            pass
        assert (tmp_path / LOCK_NAME).exists()
    assert f"taking over the lock of PID {gone.pid} (safepatching bench old.yaml)" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()
