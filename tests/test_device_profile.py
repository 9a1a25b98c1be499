"""The device profile on a CPU machine: a made-up GPU's memory decides activation recomputation, a
forced setting wins, the CPU keeps today's choices (and so today's patches, bit for bit), and the
GPU's choices, forced on the CPU, give the same patch as the CPU's."""

import contextlib

import pytest
import torch

from safepatching.config.settings import DeriveConfig, ModelLoading
from safepatching.data.sources import Example
from safepatching.method.derive import derive_patch
from safepatching.method.device_profile import derivation_profile
from safepatching.method.memory import GIB, ModelSize
from safepatching.method.objectives import LOGIT_ROWS, logit_rows, response_nll
from safepatching.models.device import DeviceMemory, device_memory
from safepatching.models.loading import load_model

SIZE = ModelSize(total_params=1_500_000_000, target_params=1_300_000_000, hidden_size=1536, intermediate_size=8960,
                 layers=28)  # fmt: skip


def gpu(free_gib: float) -> DeviceMemory:
    return DeviceMemory("cuda", "a made-up GPU", int(free_gib * GIB), int(80 * GIB))


def test_on_a_cpu_the_profile_keeps_the_memory_savings():
    profile = derivation_profile(DeriveConfig(), SIZE, DeviceMemory("cpu", "a cpu", 20 * GIB, 24 * GIB))
    assert (profile.recompute_activations, profile.logit_rows, profile.optimizer) == (True, LOGIT_ROWS, "per_tensor")
    assert profile.batches_per_pass == 1


@pytest.mark.parametrize(("free_gib", "passes"), [(70, 8), (30, 2), (24, 1)])
def test_a_gpu_puts_as_many_of_a_steps_batches_in_one_pass_as_its_free_memory_holds(free_gib, passes):
    # masters and AdamW state take 20.1 GiB, each batch of 4 x 128 tokens keeps 2.7 GiB, 2 GiB stay spare
    eight_batches = DeriveConfig(batch_size=4, gradient_accumulation_steps=8, max_length=128, recompute_activations=False)
    assert derivation_profile(eight_batches, SIZE, gpu(free_gib)).batches_per_pass == passes
    three = eight_batches.model_copy(update={"gradient_accumulation_steps": 3})  # only 1 or 3 fill a step evenly
    assert derivation_profile(three, SIZE, gpu(30)).batches_per_pass == 1


def test_on_a_gpu_with_room_nothing_is_recomputed_and_adamw_is_fused():
    profile = derivation_profile(DeriveConfig(), SIZE, gpu(70))
    assert (profile.recompute_activations, profile.logit_rows, profile.optimizer) == (False, 0, "fused")
    assert profile.reasons == ()


def test_a_gpu_too_small_to_keep_the_activations_recomputes_them_and_says_why(caplog):
    big_batches = DeriveConfig(batch_size=32, max_length=1024)
    profile = derivation_profile(big_batches, SIZE, gpu(30))
    assert profile.recompute_activations
    assert "without, deriving needs about" in profile.reasons[0] and "30.0 GiB free" in profile.reasons[0]
    assert profile.reasons[0] in caplog.text


@pytest.mark.parametrize("memory", [gpu(70), DeviceMemory("cpu", "a cpu", 20 * GIB, 24 * GIB)], ids=["gpu", "cpu"])
def test_a_forced_setting_wins_over_the_profile(memory):
    forced = DeriveConfig(recompute_activations=memory.kind == "cuda", logit_rows=64, optimizer="foreach",
                          batches_per_pass=2)  # fmt: skip
    profile = derivation_profile(forced, SIZE, memory)
    chosen = (profile.recompute_activations, profile.logit_rows, profile.optimizer, profile.batches_per_pass)
    assert chosen == (memory.kind == "cuda", 64, "foreach", 2)


def test_batches_per_pass_must_divide_the_accumulation_steps():
    with pytest.raises(ValueError, match="batches_per_pass=3 does not divide"):
        DeriveConfig(gradient_accumulation_steps=4, batches_per_pass=3)


GPU_CHOICES = {"recompute_activations": False, "logit_rows": 0, "optimizer": "fused", "batches_per_pass": 2}


@pytest.mark.parametrize(
    ("direction", "choices"),
    [("descent", {"batches_per_pass": 2}), ("npo", {"batches_per_pass": 2}), ("ascent", GPU_CHOICES)],
    ids=["descent-shared-pass", "npo-shared-pass", "ascent-every-gpu-choice"],
)
def test_the_gpu_profiles_choices_forced_on_a_cpu_give_the_cpu_profiles_patch(
    tiny_model_dir, harmful_pairs, direction, choices
):
    # batches sharing a pass must equal batches accumulated one by one; kept activations, logits in one
    # pass and fused AdamW must equal recomputation, 128-row chunks and AdamW one tensor at a time
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(compute_dtype="float32"), training=True)
    pairs = harmful_pairs + [Example(p.prompt + " Now.", p.response + " Done.") for p in harmful_pairs]
    settings = DeriveConfig(max_steps=3, batch_size=2, gradient_accumulation_steps=2, max_length=48, learning_rate=5e-3)
    patches = [
        derive_patch(model, tokenizer, pairs, direction, derive, progress=False)
        for derive in (settings, settings.model_copy(update=choices))
    ]
    assert patches[1].info["device_profile"] == {**patches[0].info["device_profile"], **choices}
    torch.testing.assert_close(patches[0].info["nll_history"], patches[1].info["nll_history"], rtol=1e-5, atol=1e-6)
    assert max(float(delta.abs().max()) for delta in patches[0].deltas.values()) > 1e-4  # training moved the weights
    for name, delta in patches[0].deltas.items():
        torch.testing.assert_close(patches[1].deltas[name], delta, rtol=1e-4, atol=1e-6)


def model_and_batch(tiny_model_dir, harmful_pairs):
    from safepatching.data.chat import collate, encode_pair

    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    batch = collate([encode_pair(tokenizer, e.prompt, e.response, 64) for e in harmful_pairs[:3]], tokenizer.pad_token_id)
    return model, batch


def loss_and_head_gradient(model, batch, *contexts):
    """The response NLL and the output head's gradient, computed with ``contexts`` entered."""
    model.zero_grad()
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        loss = response_nll(model, batch)
        loss.backward()
    return loss.detach(), model.lm_head.weight.grad.clone()


def test_logits_in_one_pass_give_the_chunked_loss_and_gradients(tiny_model_dir, harmful_pairs):
    model, batch = model_and_batch(tiny_model_dir, harmful_pairs)
    # 2 rows at a time (many chunks, recomputed) and all in one pass
    results = [loss_and_head_gradient(model, batch, logit_rows(rows)) for rows in (2, 0)]
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_the_patch_records_the_profile_it_was_derived_with(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    settings = DeriveConfig(max_steps=1, batch_size=2, max_length=48, target_modules=["q_proj"], optimizer="foreach")
    patch = derive_patch(model, tokenizer, harmful_pairs, "ascent", settings, progress=False)
    assert patch.info["device_profile"] == {"device": "cpu", "recompute_activations": True, "logit_rows": LOGIT_ROWS,
                                            "optimizer": "foreach", "batches_per_pass": 1, "reasons": []}  # fmt: skip
    assert device_memory().kind == "cpu" and device_memory().total_bytes > 0


def test_under_autocast_the_chunked_logits_cast_the_output_head_once(tiny_model_dir, harmful_pairs):
    from torch.utils._python_dispatch import TorchDispatchMode

    from safepatching.method.objectives import autocast

    class HeadCasts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            to_bf16 = func is torch.ops.aten._to_copy.default and (kwargs or {}).get("dtype") == torch.bfloat16
            if to_bf16 and tuple(args[0].shape) == self.shape:
                self.count += 1
            return func(*args, **(kwargs or {}))

    model, batch = model_and_batch(tiny_model_dir, harmful_pairs)
    casts = HeadCasts(tuple(model.lm_head.weight.shape))
    chunked = loss_and_head_gradient(model, batch, logit_rows(2), autocast(model, torch.bfloat16), casts)
    whole = loss_and_head_gradient(model, batch, logit_rows(0), autocast(model, torch.bfloat16))
    assert casts.count == 1  # not once per 2-row chunk and again in each chunk's recomputation
    assert torch.allclose(chunked[0], whole[0], atol=1e-2)
    assert torch.allclose(chunked[1], whole[1], atol=1e-2)

