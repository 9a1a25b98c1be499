"""Mixed precision: which dtype `auto` picks, refusals of dtypes without a fast path, float32 master
weights in derivation, and how close a bf16-autocast patch is to the float32 one."""

import pytest
import torch

from safepatching.config.settings import DeriveConfig, ModelLoading
from safepatching.errors import ModelError, TrainingError
from safepatching.evaluation.generation import ROW_TOKENS, length_buckets
from safepatching.method.dense import patched
from safepatching.method.derive import derive_patch
from safepatching.models import precision
from safepatching.models.loading import load_model


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend to run on a CPU with the given feature flags."""

    def pretend(*flags: str) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(precision, "compute_device", lambda: "cpu")

    return pretend


def test_auto_is_bfloat16_only_where_the_cpu_multiplies_it_fast(cpu_with):
    cpu_with("avx2", "avx512_bf16")
    assert precision.resolve_dtype("auto") == "bfloat16"
    cpu_with("avx2", "amx_bf16")
    assert precision.resolve_dtype("auto") == "bfloat16"
    cpu_with("avx2", "avx512f")
    assert precision.resolve_dtype("auto") == "float32"
    assert precision.resolve_dtype("float32") == "float32"


@pytest.mark.parametrize(("flags", "requested"), [(("avx2",), "bfloat16"), (("avx512_bf16",), "float16")])
def test_a_dtype_without_a_fast_path_is_refused_with_the_fix(cpu_with, flags, requested):
    cpu_with(*flags)
    with pytest.raises(ModelError, match="no fast path") as raised:
        precision.resolve_dtype(requested)
    assert "compute_dtype: auto" in str(raised.value) and "\n" not in str(raised.value)


def test_models_load_in_the_compute_dtype_and_in_float32_for_training(tiny_model_dir, cpu_with):
    cpu_with("avx512_bf16")
    model, _ = load_model(str(tiny_model_dir), loading=ModelLoading())
    assert next(model.parameters()).dtype == torch.bfloat16
    trained, _ = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    assert next(trained.parameters()).dtype == torch.float32
    cpu_with("avx2")
    assert next(load_model(str(tiny_model_dir), loading=ModelLoading())[0].parameters()).dtype == torch.float32


def test_derivation_refuses_low_precision_master_weights(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(compute_dtype="float32"), training=True)
    model.to(torch.bfloat16)
    with pytest.raises(TrainingError, match="float32 master weights"):
        derive_patch(model, tokenizer, harmful_pairs, "descent", DeriveConfig(max_steps=1), progress=False)


def test_autocast_derivation_keeps_float32_patches_close_to_the_float32_ones(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    settings = DeriveConfig(learning_rate=1e-3, max_steps=2, batch_size=2, gradient_accumulation_steps=1, max_length=64)
    exact = derive_patch(model, tokenizer, harmful_pairs, "descent", settings, progress=False)
    mixed = derive_patch(model, tokenizer, harmful_pairs, "descent", settings, progress=False, compute_dtype="bfloat16")
    assert mixed.info["compute_dtype"] == "bfloat16" and exact.info["compute_dtype"] == "float32"
    assert next(model.parameters()).dtype == torch.float32
    for name, delta in exact.deltas.items():
        assert mixed.deltas[name].dtype == torch.float32
        assert not torch.equal(mixed.deltas[name], delta)  # the autocast path really ran
        cosine = torch.nn.functional.cosine_similarity(mixed.deltas[name].flatten(), delta.flatten(), dim=0)
        assert cosine > 0.9, name


def test_generation_batches_hold_fewer_rows_of_long_prompts():
    lengths = [10] * 8 + [1000] * 4
    batches = length_buckets(list(range(12)), lengths, batch_size=4, max_new_tokens=24)
    assert batches[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # short prompts: full batches of 4
    assert all(len(b) * (1000 + 24) <= 4 * ROW_TOKENS or len(b) == 1 for b in batches[2:])
    assert sorted(i for b in batches for i in b) == list(range(12))


@pytest.mark.skipif("float16" in precision.fast_dtypes(), reason="this machine runs float16 fast")
def test_the_cli_refuses_a_slow_dtype_in_one_line_before_any_work(tmp_path, tiny_model_dir, run_command):
    out = tmp_path / "patch"
    args = ["derive", "--direction", "ascent", "--model", str(tiny_model_dir), "--out", str(out)]
    completed = run_command(*args, "--set", "compute_dtype=float16")
    assert completed.returncode == 2 and "no fast path" in completed.stderr
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_patch_on_a_bf16_copy_rounds_the_float32_sum_once():
    layer = torch.nn.Linear(64, 64, bias=False)
    base = layer.weight.detach().clone()
    delta = torch.randn_like(base) * 1e-3
    low = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        low.weight.copy_(base)
    before = low.weight.detach().clone()
    with patched(low, {"weight": delta}, lambda name: base):
        assert torch.equal(low.weight, (base + delta).to(torch.bfloat16))
        assert not torch.equal(low.weight, (before.float() + delta).to(torch.bfloat16))  # not rounded twice
    assert torch.equal(low.weight, before)


def test_a_master_cast_to_the_compute_dtype_computes_as_a_model_loaded_in_it(tiny_model_dir):
    from safepatching.experiments.backbone import Backbone

    loading = ModelLoading(compute_dtype="bfloat16")
    fresh, tokenizer = load_model(str(tiny_model_dir), loading=loading)
    backbone = Backbone(str(tiny_model_dir), loading, ["q_proj"])
    copy_of_master = backbone.generating_copy()  # a bf16 copy beside the float32 master
    master_cast, _ = backbone.model()  # the master itself, cast in place once training is over
    ids = tokenizer("a longer prompt so that the rotary positions reach beyond the first few", return_tensors="pt")
    with torch.no_grad():
        expected = fresh(**ids).logits
        for model in (copy_of_master, master_cast):
            assert next(model.parameters()).dtype == torch.bfloat16
            assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # Module.to would round it
            assert torch.equal(model(**ids).logits, expected)
