"""Sparse patch files: exact apply/revert, fingerprints, continual chains, streaming shards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from safepatching.patchfile.low_rank import apply_low_rank, from_ordinals, ordinals, revert_low_rank
from safepatching.patchfile.sparse import (
    PatchMismatchError,
    SparseDelta,
    apply_delta,
    apply_patches,
    diff_low_rank,
    diff_tensor,
    export_patch,
    inspect_patch,
    revert_patch,
)
from safepatching.storage.shards import WeightFolder


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_diff_apply_revert_are_bit_exact_even_for_awkward_values(dtype):
    generator = torch.Generator().manual_seed(0)
    before = torch.randn(4000, generator=generator).to(dtype)
    before[:10] = 0.0
    after = before.clone()
    touched = torch.randperm(4000, generator=generator)[:600]
    after[touched] = (before[touched].float() + 1e-3 * torch.randn(600, generator=generator)).to(dtype)
    after[touched[:20]] = -before[touched[:20]] * 3  # sign flips: deltas that do not round-trip
    after[0] = -0.0  # a change visible only in the bits
    before[1], after[1] = 1.0, 1e-6  # the delta absorbs the tiny value: needs an exact entry
    sparse = diff_tensor(before, after)
    assert sparse.exact_index.numel() >= 1 and sparse.index.numel() > 100
    assert sparse.changed == int((bits(before) != bits(after)).sum())
    assert torch.equal(bits(apply_delta(before.clone(), sparse)), bits(after))
    assert torch.equal(bits(apply_delta(after.clone(), sparse, sign=-1)), bits(before))
    assert diff_tensor(before, before.clone()) is None


def read_all(folder):
    weights = WeightFolder(folder)
    return {name: weights.read(name) for name in weights.tensors}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(bits(a[name]), bits(b[name])), name


def test_export_apply_revert_round_trip_is_bit_exact_and_sharded(tmp_path, tiny_model_dir, perturb, touched):
    patched = perturb(tiny_model_dir, tmp_path / "patched", touched)
    meta = export_patch(tiny_model_dir, patched, tmp_path / "patch", {"method": "test"}, progress=False)
    assert set(meta["tensors"]) == set(touched)
    assert meta["changed_entries"] == sum(r["changed"] for r in meta["tensors"].values()) > 0
    assert meta["patch_bytes"] < 0.1 * meta["model_bytes"]

    apply_patches([tmp_path / "patch"], tiny_model_dir, tmp_path / "applied", shard_size_mb=0, progress=False)
    index = json.loads((tmp_path / "applied/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # shard size 0 MB: one tensor per shard
    assert_bitwise_equal(read_all(tmp_path / "applied"), read_all(patched))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "applied") is not None

    record = revert_patch(tmp_path / "patch", tmp_path / "applied", tmp_path / "reverted", progress=False)
    assert record["matches_patch"]
    assert_bitwise_equal(read_all(tmp_path / "reverted"), read_all(tiny_model_dir))


def test_wrong_base_is_refused_unless_forced(tmp_path, tiny_model_dir, perturb, touched):
    patched = perturb(tiny_model_dir, tmp_path / "patched", touched)
    export_patch(tiny_model_dir, patched, tmp_path / "patch", progress=False)
    other_touched = perturb(tiny_model_dir, tmp_path / "other", touched[:1], seed=5)
    with pytest.raises(PatchMismatchError, match="differs"):
        apply_patches([tmp_path / "patch"], other_touched, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    other_untouched = perturb(tiny_model_dir, tmp_path / "other2", ["model.norm.weight"], share=1.0)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        apply_patches([tmp_path / "patch"], other_untouched, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    record = apply_patches([tmp_path / "patch"], other_touched, tmp_path / "out", force=True, progress=False)
    assert record["forced"] and not record["matches_patch"]


def test_patch_for_another_architecture_is_refused_even_when_forced(
    tmp_path, tiny_model_dir, make_tiny_model, perturb, touched
):

    patched = perturb(tiny_model_dir, tmp_path / "patched", touched)
    export_patch(tiny_model_dir, patched, tmp_path / "patch", progress=False)
    other = make_tiny_model(tmp_path / "wide", hidden_size=48)
    with pytest.raises(PatchMismatchError, match="expects"):
        apply_patches([tmp_path / "patch"], other, tmp_path / "out", force=True, progress=False)


def test_continual_patches_apply_in_order_and_are_checked_against_the_chain(tmp_path, tiny_model_dir, perturb, touched):
    round1 = perturb(tiny_model_dir, tmp_path / "round1", touched, seed=1)
    round2 = perturb(round1, tmp_path / "round2", touched[1:], seed=2)
    export_patch(tiny_model_dir, round1, tmp_path / "p1", progress=False)
    export_patch(round1, round2, tmp_path / "p2", progress=False)
    apply_patches([tmp_path / "p1", tmp_path / "p2"], tiny_model_dir, tmp_path / "both", progress=False)
    assert_bitwise_equal(read_all(tmp_path / "both"), read_all(round2))
    with pytest.raises(PatchMismatchError):
        apply_patches([tmp_path / "p2"], tiny_model_dir, tmp_path / "wrong", progress=False)


def test_inspect_reports_changes_per_layer_and_module(tmp_path, tiny_model_dir, perturb, touched):
    patched = perturb(tiny_model_dir, tmp_path / "patched", touched)
    meta = export_patch(tiny_model_dir, patched, tmp_path / "patch", progress=False)
    summary = inspect_patch(tmp_path / "patch")
    assert [row["name"] for row in summary["layers"]] == ["0", "1"]
    assert {row["name"] for row in summary["modules"]} == {"q_proj", "down_proj"}
    assert sum(row["changed"] for row in summary["modules"]) == meta["changed_entries"]
    assert all(0 < row["changed_fraction"] < 0.2 and row["delta_l2"] > 0 for row in summary["layers"])


def test_written_files_are_readable_by_others(tmp_path):
    from safepatching.storage.files import save_tensors, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "b.safetensors", {"t": torch.zeros(2)})
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o644 for name in ("a.json", "b.safetensors"))


def test_a_repeat_apply_to_unchanged_files_reuses_the_base_hashes(
    tmp_path, tiny_model_dir, perturb, touched, monkeypatch
):
    import os

    import safepatching.patchfile.sparse as sparse

    base = perturb(tiny_model_dir, tmp_path / "base", [], share=0.0)  # a private copy this test may touch
    patched = perturb(base, tmp_path / "patched", touched)
    export_patch(base, patched, tmp_path / "patch", progress=False)
    first = apply_patches([tmp_path / "patch"], base, tmp_path / "first", progress=False)
    hashed = []
    monkeypatch.setattr(sparse, "_digest_entry", lambda value: hashed.append(1) or ("F32", tuple(value.shape), "x"))
    second = apply_patches([tmp_path / "patch"], base, tmp_path / "second", progress=False)
    assert hashed == [] and second["input_fingerprint"] == first["input_fingerprint"] and second["matches_patch"]
    assert_bitwise_equal(read_all(tmp_path / "second"), read_all(patched))
    weights = next(base.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # "rewritten"
    with pytest.raises(PatchMismatchError):  # the base is hashed again (here by the stub, which matches nothing)
        apply_patches([tmp_path / "patch"], base, tmp_path / "third", progress=False)
    assert hashed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_low_rank_change_reverts_exactly_with_one_step_per_ambiguous_entry_and_few_exact_entries(dtype):
    generator = torch.Generator().manual_seed(0)
    before = (0.02 * torch.randn(300, 500, generator=generator)).to(dtype)
    before[0, :5] = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 3.0])  # zeros, values the product swamps
    factors = (0.01 * torch.randn(2, 300, generator=generator), 0.02 * torch.randn(2, 500, generator=generator))
    after = apply_low_rank(before, factors)
    change = diff_low_rank(before, after, factors)
    assert torch.equal(bits(apply_delta(before.clone(), change, 1)), bits(after))
    assert torch.equal(bits(apply_delta(after.clone(), change, -1)), bits(before))
    plain = revert_low_rank(after, factors, None)  # what format 2 reverted to before its exact entries
    wrong = int((bits(plain) != bits(before)).sum())
    near, far = change.revert_steps
    assert wrong > 100 and near.numel() >= wrong  # every wrong entry is ambiguous
    assert change.exact_index.numel() == 0  # a pure low-rank change: every entry is mended by a step
    assert far.numel() == int((near == -128).sum()) >= 2  # the values the product swamps are far away


def test_a_format_2_low_rank_change_without_steps_still_reverts_by_its_exact_entries():
    generator = torch.Generator().manual_seed(1)
    before = 0.02 * torch.randn(64, 80, generator=generator)
    factors = (0.01 * torch.randn(1, 64, generator=generator), 0.02 * torch.randn(1, 80, generator=generator))
    after = apply_low_rank(before, factors)
    wrong = torch.nonzero((bits(revert_low_rank(after, factors, None)) != bits(before)).reshape(-1)).reshape(-1)
    flat_before, flat_after = before.reshape(-1), after.reshape(-1)
    empty = torch.empty(0, dtype=torch.int32)
    old = SparseDelta(empty, torch.empty(0), wrong.int(), flat_before[wrong], flat_after[wrong], factors)
    assert wrong.numel() > 0
    assert torch.equal(bits(apply_delta(after.clone(), old, -1)), bits(before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_ordinals_count_the_dtypes_values_in_order_across_zero(dtype):
    values = torch.tensor([-2.5, -1e-3, -0.0, 0.0, 1e-3, 1.0, 3e4]).to(dtype)
    places = ordinals(values)
    assert torch.all(places[1:] > places[:-1]) and places[2:4].tolist() == [-1, 0]
    assert torch.equal(bits(from_ordinals(places, dtype)), bits(values))
    if dtype == torch.float32:  # one place up is the next representable value (nextafter is float-only)
        up = values[4:]
        assert torch.equal(from_ordinals(places[4:] + 1, dtype), torch.nextafter(up, torch.full_like(up, 1e9)))
