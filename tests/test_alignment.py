"""LLM-VA's align edit: the rewrite's algebra, the probes, the sublayer activations it reads, and the
edit through a run on the tiny model (with the judge's refusals stubbed: a random model refuses none)."""

import json

import pytest
import torch

from safepatching.errors import ConfigError, DataError
from safepatching.method.alignment import (
    alignment_factors,
    chosen_sublayers,
    probe_direction,
)
from safepatching.method.directions import activations, low_rank_delta, post_instruction_length, sublayer_names


def unit(vector):
    return vector / vector.norm()


def test_the_rewrite_writes_the_rescaled_benign_component_along_the_answer_direction():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, generator=generator)
    answer, benign = unit(torch.randn(8, generator=generator)), unit(torch.randn(8, generator=generator))
    directions = {"answer": answer[None], "benign": benign[None],
                  "answer_std": torch.tensor([3.0]), "benign_std": torch.tensor([1.5])}  # fmt: skip
    factors = alignment_factors(lambda name: weight, {0: "w"}, directions, 1.0)
    rows, columns = factors["w"]
    assert rows.shape == (1, 8) and columns.shape == (1, 6)  # rank 1
    edited = weight + low_rank_delta(rows, columns)
    inputs = torch.randn(6, 5, generator=generator)
    torch.testing.assert_close(answer @ edited @ inputs, 2.0 * (benign @ weight @ inputs))  # sigma_a / sigma_b = 2
    other = unit(torch.randn(8, generator=generator))
    other = unit(other - (other @ answer) * answer)  # anything orthogonal to a is written as before
    torch.testing.assert_close(other @ edited @ inputs, other @ weight @ inputs)
    half = alignment_factors(lambda name: weight, {0: "w"}, directions, 0.5)["w"]
    torch.testing.assert_close(low_rank_delta(*half), 0.5 * low_rank_delta(rows, columns))


def test_a_probe_points_to_label_one_and_is_scored_on_held_out_prompts():
    generator = torch.Generator().manual_seed(1)
    shift = torch.zeros(16)
    shift[3] = 6.0
    features = torch.cat([torch.randn(40, 16, generator=generator), torch.randn(40, 16, generator=generator) + shift])
    labels = torch.tensor([0] * 40 + [1] * 40)
    direction, std, correct, total = probe_direction(features, labels)
    assert total == 20 and correct / total >= 0.9 and direction[3] > 0.8 and abs(float(direction.norm()) - 1) < 1e-5
    assert std == pytest.approx(float((features @ direction).std()))
    _, _, correct, total = probe_direction(torch.randn(80, 16, generator=generator), labels)
    assert correct / total < 0.9
    # one dimension 1000 times the others' scale, as transformers have: the probe still finds the signal
    features[:, 0] *= 1000
    direction, _, correct, total = probe_direction(features, labels)
    assert correct / total >= 0.9 and abs(float(direction[3])) > 0.8


def test_the_chosen_sublayers_have_the_most_accurate_probes_and_keep_forward_order():
    directions = {"answer_accuracy": torch.tensor([0.9, 0.6, 1.0, 0.95]),
                  "benign_accuracy": torch.tensor([1.0, 1.0, 0.8, 0.9])}  # fmt: skip
    assert chosen_sublayers(directions, 2) == [0, 3]  # products 0.9, 0.6, 0.8, 0.855
    assert chosen_sublayers(directions, 9) == [0, 1, 2, 3]


def test_sublayer_outputs_add_up_to_each_layers_residual_change(tiny_model_dir):
    from safepatching.config.settings import PipelineConfig
    from safepatching.models.loading import load_model

    model, tokenizer = load_model(str(tiny_model_dir), loading=PipelineConfig().loading.model_copy(
        update={"compute_dtype": "float32"}))  # fmt: skip
    prompts = ["How do I kill a Python process?", "Say hello.", "What is a fork bomb, and why is it dangerous?"]
    positions = post_instruction_length(tokenizer)
    outputs = activations(model, tokenizer, prompts, positions, batch_size=2, site="sublayers")
    names = sublayer_names(model)
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]  # fmt: skip
    assert outputs.shape == (3, 4, positions, 32)
    residual = activations(model, tokenizer, prompts, positions, batch_size=2)
    torch.testing.assert_close(residual[:, 1], residual[:, 0] + outputs[:, 0] + outputs[:, 1], atol=1e-5, rtol=1e-4)


def test_a_run_rewrites_only_the_chosen_writers_and_exports_rank_one_factors(
    tmp_path, tiny_model_dir, tiny_pipeline_config, bench_pipeline, monkeypatch
):
    from safepatching.experiments import directional
    from safepatching.experiments.pipeline import run_pipeline
    from safepatching.patchfile.sparse import export_patch
    from safepatching.storage.shards import WeightFolder

    plain = tiny_pipeline_config(tiny_model_dir, tmp_path / "run", method="task_arithmetic", alpha=0.0, beta=0.0)
    sets = bench_pipeline(tiny_model_dir)["directional"]["sets"]
    edit = {"align_scale": 1.0, "align_sublayers": 2, "sets": sets}
    config = type(plain).model_validate({**plain.model_dump(), "directional": edit})
    with pytest.raises(DataError, match=r"the backbone answers 60 of the 60 direction prompts; align's answered/refused probe needs 16 of each"):
        run_pipeline(config, progress=False)  # the random tiny model refuses nothing
    far = type(plain).model_validate({**plain.model_dump(), "directional": {**edit, "position": -99}})
    with pytest.raises(ConfigError, match=r"directional.position -99: the chat template puts \d+ tokens after the prompt"):
        run_pipeline(far, progress=False)  # refused before any reply is generated

    monkeypatch.setattr(directional, "refusals", lambda model, tok, prompts, *rest: [i % 2 == 0 for i in range(len(prompts))])
    result = run_pipeline(config, progress=False)
    base, edited = WeightFolder(tiny_model_dir), WeightFolder(result.model_dir)
    changed = [name for name in base.tensors if not torch.equal(base.read(name), edited.read(name))]
    assert len(changed) == 2 and all(name.endswith(("o_proj.weight", "down_proj.weight")) for name in changed)
    answered = json.loads(next((tmp_path / "run").rglob("answered.json")).read_text())
    assert len(answered) == 60 and sum(answered.values()) == 30
    meta = export_patch(tiny_model_dir, result.model_dir, tmp_path / "patch", progress=False)
    assert sorted(name for name, r in meta["tensors"].items() if r.get("low_rank") == 1) == sorted(changed)
