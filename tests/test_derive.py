import pytest
import torch

from safepatching.config.identity import cache_identity
from safepatching.config.settings import DeriveConfig, ImportanceConfig, ModelLoading
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.stages import Stages
from safepatching.method.dense import holds_base, load_dense_patch, patched, save_dense_patch
from safepatching.method.derive import derive_patch, make_loader, target_parameter_names
from safepatching.method.importance import snip_scores
from safepatching.method.objectives import npo_losses, response_logprobs, response_nll
from safepatching.models.loading import load_model

FAST = {"learning_rate": 5e-3, "max_steps": 4, "batch_size": 2, "max_length": 64}


def mean_nll(model, tokenizer, pairs):
    loader = make_loader(tokenizer, pairs, 64, len(pairs), seed=0, shuffle=False)
    with torch.no_grad():
        return float(response_nll(model, next(iter(loader))))


def test_ascent_raises_and_descent_lowers_training_nll(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    before = mean_nll(model, tokenizer, harmful_pairs)
    settings = DeriveConfig(**FAST, ascent_max_nll_increase=100.0)
    for direction, compare in (("ascent", float.__gt__), ("descent", float.__lt__)):
        patch = derive_patch(model, tokenizer, harmful_pairs, direction, settings, seed=0, progress=False)
        assert mean_nll(model, tokenizer, harmful_pairs) == before  # the backbone is restored
        with patched(model, patch.deltas):
            after = mean_nll(model, tokenizer, harmful_pairs)
        assert compare(after, before + (0.05 if direction == "ascent" else -0.05)), (direction, before, after)


def test_npo_starts_at_its_closed_form_and_raises_the_nll(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    loader = make_loader(tokenizer, harmful_pairs, 64, len(harmful_pairs), seed=0, shuffle=False, reference=model)
    batch = next(iter(loader))
    (loss,), (nll,) = npo_losses(model, batch, beta=0.1, batch_size=len(harmful_pairs))
    # at the reference point the log-ratio is 0, so the loss is (2/beta) log 2 and its gradient is
    # exactly the gradient of the mean negative sequence log-probability (gradient ascent's direction)
    assert float(loss) == pytest.approx(20 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert float(nll) == pytest.approx(float(response_nll(model, batch)), rel=1e-5)
    weight = model.model.layers[0].mlp.down_proj.weight
    (npo_grad,) = torch.autograd.grad(loss, weight)
    logprobs, _ = response_logprobs(model, batch)
    (ga_grad,) = torch.autograd.grad(logprobs.mean(), weight)
    torch.testing.assert_close(npo_grad, ga_grad, rtol=1e-4, atol=1e-7)
    before = mean_nll(model, tokenizer, harmful_pairs)
    settings = DeriveConfig(**FAST, ascent_max_nll_increase=100.0)
    patch = derive_patch(model, tokenizer, harmful_pairs, "npo", settings, seed=0, progress=False)
    assert mean_nll(model, tokenizer, harmful_pairs) == before
    with patched(model, patch.deltas):
        assert mean_nll(model, tokenizer, harmful_pairs) > before + 0.05
    assert patch.info["direction"] == "npo" and len(patch.info["nll_history"]) == 4


def test_a_given_model_is_restored_from_the_weight_files_only_while_it_holds_them(
    tmp_path, tiny_model_dir, tiny_pipeline_config
):
    # a study hands its float32 master to the stages: restoring it from the files saves a copy of every
    # patched tensor, but a model that no longer holds the files' weights (a continual round's) needs one
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    config = tiny_pipeline_config(tiny_model_dir, tmp_path)
    run = Backbone(config.model, ModelLoading(), config.derive.target_modules, loaded=(model, tokenizer))
    names = target_parameter_names(model, config.derive.target_modules)
    before = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    assert run.restore_source(model, names) == run.base_weight
    deltas = {name: torch.full_like(before[name], 0.5) for name in names}
    with patched(model, deltas, run.restore_source(model, names)):
        assert all(torch.equal(model.get_parameter(name), before[name] + 0.5) for name in names)
    assert all(torch.equal(weight, before[name]) for name, weight in model.named_parameters())

    with torch.no_grad():
        model.get_parameter(names[-1]).add_(1.0)
    assert run.restore_source(model, names) is None
    assert holds_base(model, names[:-1], run.base_weight) == run.base_weight
    assert holds_base(model.to(torch.bfloat16), names[:-1], run.base_weight) is None


def test_same_seed_gives_the_same_patch(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    settings = DeriveConfig(**FAST)
    first = derive_patch(model, tokenizer, harmful_pairs, "ascent", settings, seed=11, progress=False)
    second = derive_patch(model, tokenizer, harmful_pairs, "ascent", settings, seed=11, progress=False)
    third = derive_patch(model, tokenizer, harmful_pairs, "ascent", settings, seed=12, progress=False)
    assert first.deltas.keys() == second.deltas.keys()
    assert all(torch.equal(first.deltas[n], second.deltas[n]) for n in first.deltas)
    assert any(not torch.equal(first.deltas[n], third.deltas[n]) for n in first.deltas)


def test_patch_covers_only_target_modules(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    settings = DeriveConfig(**FAST, target_modules=["down_proj"])
    patch = derive_patch(model, tokenizer, harmful_pairs, "descent", settings, progress=False)
    assert sorted(patch.deltas) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert all(float(d.abs().sum()) > 0 for d in patch.deltas.values())


def test_ascent_stops_at_the_nll_bound(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    settings = DeriveConfig(learning_rate=5e-2, max_steps=50, batch_size=4, max_length=64, ascent_max_nll_increase=0.3)
    patch = derive_patch(model, tokenizer, harmful_pairs, "ascent", settings, progress=False)
    history = patch.info["nll_history"]
    assert patch.info["stop_reason"] == "nll_ceiling"
    assert len(history) < 50 and history[-1] > history[0] + 0.3


def test_before_overshoot_drops_the_update_that_crossed_the_ceiling(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    common = {"learning_rate": 5e-2, "batch_size": 4, "max_length": 64, "ascent_max_nll_increase": 0.3}
    after = derive_patch(
        model, tokenizer, harmful_pairs, "ascent", DeriveConfig(**common, max_steps=50), progress=False
    )
    before = derive_patch(
        model, tokenizer, harmful_pairs, "ascent",
        DeriveConfig(**common, max_steps=50, ascent_stop="before_overshoot"), progress=False,
    )  # fmt: skip
    steps = len(after.info["nll_history"])
    assert before.info["nll_history"] == after.info["nll_history"] and before.info["stop_reason"] == "nll_ceiling"
    assert (after.info["updates"], before.info["updates"]) == (steps, steps - 1)
    # the same run cut one step short by max_steps: identical weights
    short = derive_patch(
        model, tokenizer, harmful_pairs, "ascent", DeriveConfig(**common, max_steps=steps - 1), progress=False
    )
    assert all(torch.equal(before.deltas[n], short.deltas[n]) for n in short.deltas)
    assert not all(torch.equal(before.deltas[n], after.deltas[n]) for n in after.deltas)
    # the default stays out of cache keys, so patches derived before the setting existed stay valid
    assert "ascent_stop" not in cache_identity(DeriveConfig())
    assert "ascent_stop" in cache_identity(DeriveConfig(ascent_stop="before_overshoot"))


def test_lora_patch_is_materialised_as_full_delta(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = DeriveConfig(**FAST, method="lora", lora_rank=2, target_modules=["q_proj", "v_proj"])
    patch = derive_patch(model, tokenizer, harmful_pairs, "descent", settings, progress=False)
    assert set(patch.deltas) == {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    delta = patch.deltas["model.layers.0.self_attn.q_proj.weight"]
    assert delta.shape == reference["model.layers.0.self_attn.q_proj.weight"].shape
    assert float(delta.abs().sum()) > 0
    assert torch.linalg.matrix_rank(delta) <= 2
    assert dict(model.named_parameters()).keys() == reference.keys()
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


def test_patch_save_load_round_trip(tmp_path, tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    patch = derive_patch(model, tokenizer, harmful_pairs, "ascent", DeriveConfig(**FAST), progress=False)
    save_dense_patch(patch, tmp_path / "patch", {"label": "safety"})
    loaded = load_dense_patch(tmp_path / "patch")
    assert loaded.info["label"] == "safety" and loaded.info["steps"] == patch.info["steps"]
    assert all(torch.equal(loaded.deltas[n], patch.deltas[n]) for n in patch.deltas)


def test_snip_scores_are_abs_weight_times_gradient(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    names = target_parameter_names(model, ["o_proj"])
    scores = snip_scores(
        model, tokenizer, harmful_pairs, names, ImportanceConfig(batch_size=4, max_length=64), progress=False
    )
    loader = make_loader(tokenizer, harmful_pairs, 64, 4, seed=0, shuffle=False)
    response_nll(model, next(iter(loader))).backward()
    for name in names:
        param = dict(model.named_parameters())[name]  # scores live on the CPU, gradients where the model is
        assert torch.allclose(scores[name], (param.detach() * param.grad).abs().cpu(), atol=1e-7)


def test_snip_scores_average_batches_holding_one_gradient_at_a_time(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    names = target_parameter_names(model, ["o_proj", "down_proj"])
    params = dict(model.named_parameters())
    held = []  # how many target gradients exist each time one is finished (before it is folded)
    for name in names:
        params[name].register_post_accumulate_grad_hook(
            lambda _: held.append(sum(params[n].grad is not None for n in names))
        )
    scores = snip_scores(
        model, tokenizer, harmful_pairs, names, ImportanceConfig(batch_size=2, max_length=64), progress=False
    )
    assert held and max(held) == 1
    loader = make_loader(tokenizer, harmful_pairs, 64, 2, seed=0, shuffle=False)
    expected = {name: torch.zeros_like(params[name]) for name in names}
    for batch in loader:
        response_nll(model, batch).backward()
        for name in names:
            expected[name] += (params[name].detach() * params[name].grad).abs()
            params[name].grad = None
    assert len(loader) > 1
    for name in names:
        assert torch.allclose(scores[name], expected[name].cpu() / len(loader), atol=1e-7)


def test_non_finite_loss_stops_derivation_with_a_clear_error(tiny_model_dir, harmful_pairs):
    from safepatching.errors import TrainingError

    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = DeriveConfig(
        learning_rate=1e30, max_steps=30, batch_size=4, max_length=64, max_grad_norm=1e30, ascent_max_nll_increase=1e30
    )
    with pytest.raises(TrainingError, match="learning_rate"):
        derive_patch(model, tokenizer, harmful_pairs, "ascent", settings, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the backbone is restored


def test_the_safety_patch_can_unlearn_by_npo(tmp_path, tiny_model_dir, tiny_pipeline_config):

    base = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    assert "unlearning" not in cache_identity(base.derive)  # patches derived before it keep their keys
    npo = base.model_copy(update={"derive": base.derive.model_copy(update={"unlearning": "npo"})})
    stages = Stages(npo, progress=False)
    assert stages.keys.derive("safety") != Stages(base, progress=False).keys.derive("safety")
    safety, over_safety = stages.patches.derive(stages.harmful_pairs())
    assert safety.info["direction"] == "npo" and over_safety.info["direction"] == "descent"
