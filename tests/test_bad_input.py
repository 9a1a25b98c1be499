"""Bad input through the CLI: a one-line error naming problem and fix, exit 2, no traceback, no output.

Each case builds its broken input, runs the command in-process through the real entry point and
checks the same four things. `--debug` is the only way to see a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from safepatching.cli import application as cli
from safepatching.errors import SafePatchingError
from safepatching.patchfile.sparse import export_patch

PAIRS = [{"prompt": f"How do I do bad thing {i}?", "response": f"Here is how to do bad thing {i}."} for i in range(4)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the inputs printed
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "")  # --no-progress sets it; restored after the test
    monkeypatch.setattr(sys, "argv", ["safepatching", *args])
    monkeypatch.setitem(cli.STATE, "debug", False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def patch_setup(tmp_path_factory, tiny_model_dir, perturb, touched):
    root = tmp_path_factory.mktemp("patch-setup")
    patched = perturb(tiny_model_dir, root / "patched", touched)
    export_patch(tiny_model_dir, patched, root / "patch", progress=False)
    return root


def derive_args(model, data, out, *extra):
    return ["derive", "--direction", "ascent", "--model", str(model), "--data", str(data), "--out", str(out),
            "--no-progress", "--set", "harmful_train.response_column=response", "--set", "derive.max_steps=1",
            "--set", "derive.max_length=48", *extra]  # fmt: skip


def apply_args(patch, base, out, *extra):
    return ["apply", str(patch), "--base", str(base), "--out", str(out), "--no-progress", *extra]


# Each case: (id, builder(tmp, model, setup) -> argv, expected text in the error); setup.root holds the patch
def missing_file(tmp, model, _):
    return derive_args(model, tmp / "absent.jsonl", tmp / "out"), "does not exist"


def unreadable_file(tmp, model, _):
    (tmp / "dir.jsonl").mkdir()
    return derive_args(model, tmp / "dir.jsonl", tmp / "out"), "dir.jsonl"


def wrong_prompt_column(tmp, model, _):
    data = write_jsonl(tmp / "d.jsonl", [{"question": "q", "response": "r"}])
    return derive_args(model, data, tmp / "out"), "prompt"


def missing_response_column(tmp, model, _):
    data = write_jsonl(tmp / "d.jsonl", [{"prompt": "q"}])
    return derive_args(model, data, tmp / "out"), "response"


def empty_dataset(tmp, model, _):
    (tmp / "d.jsonl").write_text("")
    return derive_args(model, tmp / "d.jsonl", tmp / "out"), "d.jsonl"


def non_utf8_text(tmp, model, _):
    (tmp / "d.jsonl").write_bytes(b'{"prompt": "\xff\xfe bad", "response": "x"}\n')
    return derive_args(model, tmp / "d.jsonl", tmp / "out"), "UTF-8"


def malformed_json_line(tmp, model, _):
    (tmp / "d.jsonl").write_text('{"prompt": "q", "response": \n')
    return derive_args(model, tmp / "d.jsonl", tmp / "out"), "d.jsonl"


def bad_setting(name: str, setting: str, expected: str):
    """A case where one --set override is wrong (unknown key, bad value, invalid hyper-parameter...)."""

    def case(tmp, model, _):
        data = write_jsonl(tmp / "d.jsonl", PAIRS)
        return derive_args(model, data, tmp / "out", "--set", setting), expected

    case.__name__ = name
    return case


unknown_config_key = bad_setting("unknown_config_key", "merge.alphaa=1", "merge.alphaa")
unknown_config_value = bad_setting("unknown_config_value", "merge.mask_scope=everywhere", "mask_scope")
invalid_hyperparameter = bad_setting("invalid_hyperparameter", "derive.learning_rate=-1", "learning_rate")
invalid_percentage = bad_setting("invalid_percentage", "merge.top_a=150", "top_a")
unknown_merge_method = bad_setting("unknown_merge_method", "merge.method=magic", "merge method")


def unknown_direction(tmp, model, _):
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    args = derive_args(model, data, tmp / "out")
    args[args.index("ascent")] = "sideways"
    return args, "direction"


def bad_yaml(tmp, model, _):
    (tmp / "c.yaml").write_text("merge: [unclosed\n")
    return ["run", str(tmp / "c.yaml"), "--out", str(tmp / "out")], "YAML"


def missing_model(tmp, _model, _):
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    return derive_args(tmp / "no-model", data, tmp / "out"), "does not exist"


def pickle_only_model(tmp, model, _):
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((model / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    return derive_args(folder, data, tmp / "out"), "allow_pickle"


def remote_code_model(tmp, model, _):
    folder = tmp / "remote"
    folder.mkdir()
    for file in model.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "someone-elses-architecture"  # only the repository's own code could load it
    config["auto_map"] = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}
    (folder / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    return derive_args(folder, data, tmp / "out"), "trust_remote_code"


def nan_during_ascent(tmp, model, _):
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    extra = ["--set", "derive.learning_rate=1e30", "--set", "derive.max_grad_norm=1e30", "--set",
             "derive.ascent_max_nll_increase=1e30", "--set", "derive.max_steps=30", "--set", "derive.batch_size=4"]  # fmt: skip
    return derive_args(model, data, tmp / "out", *extra), "NLL became"


def truncated_safetensors(tmp, model, setup):
    broken = tmp / "patch"
    broken.mkdir()
    (broken / "patch.json").write_text((setup.root / "patch" / "patch.json").read_text())
    (broken / "patch.safetensors").write_bytes((setup.root / "patch" / "patch.safetensors").read_bytes()[:-100])
    return apply_args(broken, model, tmp / "out"), "truncated"


def corrupted_safetensors(tmp, model, setup):
    broken = tmp / "patch"
    broken.mkdir()
    (broken / "patch.json").write_text((setup.root / "patch" / "patch.json").read_text())
    (broken / "patch.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    return apply_args(broken, model, tmp / "out"), "corrupted"


def not_a_patch(tmp, model, _):
    (tmp / "folder").mkdir()
    (tmp / "folder" / "patch.json").write_text('{"hello": 1}')
    return apply_args(tmp / "folder", model, tmp / "out"), "not a portable patch file"


def mismatched_architecture(tmp, _model, setup):
    other = setup.make_tiny_model(tmp / "wide", hidden_size=48)
    return apply_args(setup.root / "patch", other, tmp / "out", "--force-mismatch"), "expects"


def wrong_fingerprint(tmp, model, setup):
    other = setup.perturb(model, tmp / "other", setup.touched[:1], seed=9)
    return apply_args(setup.root / "patch", other, tmp / "out"), "--force-mismatch"


def revert_unpatched_model(tmp, model, setup):
    return [
        "revert",
        str(setup.root / "patch"),
        "--model",
        str(model),
        "--out",
        str(tmp / "out"),
        "--no-progress",
    ], "differs"


def existing_output_without_force(tmp, model, setup):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return apply_args(setup.root / "patch", model, tmp / "out"), "--force"


def unknown_benchmark(tmp, model, _):
    return ["eval", "--model", str(model), "--out", str(tmp / "out"), "--set", "eval.harmful.source=bench:nope",
            "--no-progress"], "unknown benchmark 'nope'"  # fmt: skip


def run_args(tmp, model, evaluation: dict, *extra) -> list[str]:
    """`run` of a one-step config on the tiny model whose eval section is ``evaluation``."""
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    (tmp / "c.yaml").write_text(json.dumps({
        "model": str(model), "output_dir": str(tmp / "out"), "derive": {"max_steps": 1, "max_length": 48},
        "harmful_train": {"source": str(data), "response_column": "response"}, "eval": evaluation,
    }))  # fmt: skip
    return ["run", str(tmp / "c.yaml"), "--no-progress", *extra]


# what the evaluation needs fails before the derivation, not after it
def judge_without_model(tmp, model, _):
    return run_args(tmp, model, {"refusal_judge": "llama-guard"}), "needs a local judge model"


def missing_judge_model(tmp, model, _):
    judge = {"judge": "harmbench-classifier", "judge_model": str(tmp / "no-judge")}
    return run_args(tmp, model, judge), "no-judge does not exist"


def judge_keywords_missing(tmp, model, _):
    return run_args(tmp, model, {"judge": "gcg"}, "--data-dir", str(tmp)), "refusal_keywords"


def jailbreak_templates_missing(tmp, model, _):
    return run_args(tmp, model, {"jailbreaks": ["dan"]}, "--data-dir", str(tmp)), "no DAN templates"


def utility_files_missing(tmp, model, _):
    return run_args(tmp, model, {"utility": {"mmlu_examples": 5}}, "--data-dir", str(tmp)), "MMLU"


def missing_expert(tmp, model, _):
    expert = {"decoding": {"method": "safedecoding", "expert_model": str(tmp / "no-expert")}}
    return run_args(tmp, model, expert), "no-expert does not exist"


def missing_compared_model(tmp, model, _):  # named before the first model's evaluation, not after it
    return ["eval", "--compare", str(model), str(tmp / "no-model"), "--out", str(tmp / "out"),
            "--no-progress"], "no-model does not exist"  # fmt: skip


CASES = [
    missing_file, unreadable_file, wrong_prompt_column, missing_response_column, empty_dataset, non_utf8_text,
    malformed_json_line, unknown_config_key, unknown_config_value, invalid_hyperparameter, invalid_percentage,
    unknown_merge_method, unknown_direction, bad_yaml, missing_model, pickle_only_model, remote_code_model,
    nan_during_ascent, truncated_safetensors, corrupted_safetensors, not_a_patch, mismatched_architecture,
    wrong_fingerprint, revert_unpatched_model, existing_output_without_force, unknown_benchmark, judge_without_model,
    missing_judge_model, judge_keywords_missing, jailbreak_templates_missing, utility_files_missing, missing_expert,
    missing_compared_model,
]  # fmt: skip


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name or p.name.endswith(".checkpoint")]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_gives_one_line_error_and_no_output(
    case, tmp_path, tiny_model_dir, patch_setup, monkeypatch, capsys, make_tiny_model, perturb, touched
):
    setup = SimpleNamespace(root=patch_setup, make_tiny_model=make_tiny_model, perturb=perturb, touched=touched)
    args, expected = case(tmp_path, tiny_model_dir, setup)
    existed_before = (tmp_path / "out").exists()
    code, stderr = run_main(monkeypatch, capsys, args)
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert expected in lines[0] and "Fix:" in lines[0], lines[0]
    assert "Traceback" not in stderr
    if existed_before:
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_disk_full_while_writing_leaves_no_partial_output(tmp_path, tiny_model_dir, patch_setup, monkeypatch, capsys):
    import safepatching.storage.shards as shards

    def full_disk(handle, buffer):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_buffer", full_disk)
    code, stderr = run_main(monkeypatch, capsys, apply_args(patch_setup / "patch", tiny_model_dir, tmp_path / "out"))
    assert code == 2 and "no space left" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["safepatching", "--debug", "run", str(tmp_path / "absent.yaml")])
    with pytest.raises(Exception, match="does not exist"):
        cli.main()


def test_overlong_examples_are_truncated_with_one_warning(tmp_path, tiny_model_dir, monkeypatch, caplog):
    rows = [{"prompt": "why " * 400, "response": "because " * 400} for _ in range(2)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "")
    monkeypatch.setattr(sys, "argv", ["safepatching", *derive_args(tiny_model_dir, data, tmp_path / "out")])
    caplog.set_level(logging.INFO)
    cli.main()
    assert "2 of 2 pairs were cut at 48 tokens" in caplog.text
    assert "longer than derive.max_length=48 tokens are cut" in caplog.text
    assert (tmp_path / "out" / "deltas.safetensors").exists()


def test_derive_alone_does_not_check_the_evaluation_settings(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    no_templates = ["--data-dir", str(tmp_path), "--set", "eval.jailbreaks=[dan]"]
    args = derive_args(tiny_model_dir, data, tmp_path / "out", *no_templates)
    monkeypatch.setattr(sys, "argv", ["safepatching", *args])
    cli.main()  # the run would refuse this data directory (no jailbreak templates); a derivation has no use for them
    assert (tmp_path / "out" / "deltas.safetensors").exists()


def not_found_on_hub(spec, timeout=None):
    from huggingface_hub.errors import RepositoryNotFoundError

    raise RepositoryNotFoundError(f"{spec} not found", response=SimpleNamespace(headers={}, status_code=404))


def hub_unreachable(spec, timeout=None):
    raise ConnectionError("Name or service not known")


@pytest.mark.parametrize("hub", ["offline", "unreachable", "no such model"])
@pytest.mark.parametrize("command", ["demo", "derive", "eval"])
def test_an_unknown_model_fails_fast_naming_the_demo_models_and_leaves_nothing(
    hub, command, tmp_path, monkeypatch, capsys
):
    import time

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub == "offline")
    monkeypatch.setattr(huggingface_hub, "model_info", hub_unreachable if hub == "unreachable" else not_found_on_hub)
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    args = {
        "demo": ["demo", "--model", "no-such-model", "--no-progress"],
        "derive": derive_args("no-such-model", data, tmp_path / "out"),
        "eval": ["eval", "--model", "no-such-model", "--out", str(tmp_path / "out"), "--no-progress"],
    }[command]
    started = time.perf_counter()
    code, stderr = run_main(monkeypatch, capsys, args)
    assert time.perf_counter() - started < 10
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "'no-such-model' is not a demo model" in stderr
    assert "qwen2.5-coder-0.5b-instruct" in stderr and "smollm2-135m-instruct" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no run folder, no config.yaml


def test_a_hub_id_in_the_local_cache_is_accepted_offline(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from safepatching.models.loading import check_model_source

    snapshot = tmp_path / "hub" / "models--someone--tiny-chat" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--tiny-chat" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-chat" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "model_info", hub_unreachable)
    check_model_source("someone/tiny-chat")  # found in the cache: no hub call, no error
    with pytest.raises(SafePatchingError, match="HF_HUB_OFFLINE"):
        check_model_source("someone/other-chat")


def test_apply_names_a_folder_that_is_not_a_patch_before_the_base(tmp_path, monkeypatch, capsys):
    (tmp_path / "folder").mkdir()
    code, stderr = run_main(monkeypatch, capsys, apply_args(tmp_path / "folder", "no-such-model", tmp_path / "out"))
    assert code == 2 and "not a portable patch file" in stderr and "no-such-model" not in stderr, stderr


def test_help_and_errors_come_fast_without_importing_heavy_libraries(tmp_path):
    import subprocess
    import time

    probe = (
        "import sys, time; started = time.perf_counter(); sys.argv = ['safepatching', '--help']\n"
        "from safepatching.cli.application import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets', 'scipy') if m in sys.modules)\n"
        "print('HEAVY', heavy, time.perf_counter() - started)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    heavy_line = result.stdout.strip().splitlines()[-1]
    assert heavy_line.startswith("HEAVY [] "), heavy_line
    assert float(heavy_line.split()[-1]) < 3, heavy_line  # generous: about 0.3 s on 2 cores
    started = time.perf_counter()
    missing = subprocess.run(
        [sys.executable, "-m", "safepatching", "run", str(tmp_path / "absent.yaml")], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert elapsed < 5, f"an error took {elapsed:.1f} s"  # generous: about 0.5 s on 2 cores
