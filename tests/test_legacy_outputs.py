"""Outputs written before the package layout changed still load, and the reference pipeline's
outputs are bit-identical to those the earlier code wrote (tests/fixtures/legacy, made with the
code at commit e1cbb6c on the same tiny model and config)."""

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from safepatching.cli.application import main
from safepatching.errors import SafePatchingError
from safepatching.experiments.pipeline import run_pipeline
from safepatching.method.dense import load_dense_patch
from safepatching.models.precision import cpu_flags
from safepatching.patchfile import apply_patches, inspect_patch
from safepatching.patchfile.sparse import open_patch

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
TIMING_KEYS = {"part_seconds", "generation", "wall_seconds"}


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """The fixtures as the earlier code wrote them. Weight files are kept in git as base64 text
    (``NAME.b64``) and decoded here to their exact original bytes."""
    folder = tmp_path_factory.mktemp("legacy")
    for source in FIXTURES.rglob("*"):
        if source.is_file():
            target = folder / source.relative_to(FIXTURES)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.suffix == ".b64":
                target.with_suffix("").write_bytes(base64.b64decode(source.read_text()))
            else:
                target.write_bytes(source.read_bytes())
    return folder


def tensor_digests(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return {
            name: hashlib.sha256(handle.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for name in sorted(handle.keys())
        }


def run_digest(run: Path) -> dict:
    """Every tensor of the run bit for bit, every reply (records.jsonl) and every metric but timings."""
    digest = {}
    for relative in (
        "patches/safety/deltas.safetensors",
        "patches/over_safety/deltas.safetensors",
        "importance/safety.safetensors",
        "importance/over_safety.safetensors",
        "model/model.safetensors",
    ):
        digest[relative] = tensor_digests(run / relative)
    for which in ("backbone", "patched"):
        metrics = json.loads((run / f"eval/{which}/metrics.json").read_text())
        digest[f"eval/{which}/metrics"] = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
        records = (run / f"eval/{which}/records.jsonl").read_bytes()
        digest[f"eval/{which}/records"] = hashlib.sha256(records).hexdigest()
    return digest


def recorded_digest() -> Path:
    """The digests of this CPU's kernel family: float32 sums round differently between them. AVX-512
    without AMX: written by the code at e1cbb6c; AMX CPUs: by the code at bd59797 (which matched
    e1cbb6c's digests on AVX-512)."""
    return FIXTURES / ("reference-digest-amx.json" if "amx_bf16" in cpu_flags() else "reference-digest.json")


@pytest.mark.skipif(
    torch.cuda.is_available() or "avx512f" not in cpu_flags(),
    reason="the digests were recorded with AVX-512 CPU kernels; other kernels round float32 sums differently",
)
def test_reference_pipeline_outputs_are_bit_identical_to_the_earlier_code(
    tmp_path, tiny_model_dir, tiny_pipeline_config
):
    run_pipeline(tiny_pipeline_config(tiny_model_dir, tmp_path / "run"), progress=False)
    expected = json.loads(recorded_digest().read_text())
    digest = run_digest(tmp_path / "run")
    for which in ("backbone", "patched"):  # metrics added since (e.g. compute_dtype) are not compared
        metrics = digest[f"eval/{which}/metrics"]
        digest[f"eval/{which}/metrics"] = {k: metrics[k] for k in expected[f"eval/{which}/metrics"]}
    assert digest == expected


def test_a_dense_patch_written_before_the_rename_loads(tiny_model_dir, legacy):
    patch = load_dense_patch(legacy / "derived-safety")
    assert patch.info["direction"] == "ascent" and patch.info["label"] == "safety"
    assert "model.layers.0.self_attn.q_proj.weight" in patch.deltas
    assert patch.deltas["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_a_sparse_patch_written_before_the_change_applies_to_its_base(tmp_path, tiny_model_dir, legacy):
    assert inspect_patch(legacy / "sparse-patch")["changed_entries"] > 0
    apply_patches([legacy / "sparse-patch"], tiny_model_dir, tmp_path / "applied", progress=False)
    assert (tmp_path / "applied" / "model.safetensors").is_file()


def test_apply_names_a_dense_patch_for_what_it_is(tmp_path, tiny_model_dir, capsys, monkeypatch, legacy):
    with pytest.raises(SafePatchingError, match="derived dense patch"):
        open_patch(legacy / "derived-safety")
    arguments = ["apply", str(legacy / "derived-safety"), "--base", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    monkeypatch.setattr("sys.argv", ["safepatching", *arguments])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2 and "safepatching merge" in capsys.readouterr().err
