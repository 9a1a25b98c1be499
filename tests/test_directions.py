"""Residual-stream directions and the projection edit on a tiny random model: activations line up at
the post-instruction positions, the edit removes the direction from everything the model writes,
and probes tell separable sets apart."""

import pytest
import torch

from safepatching.config.settings import ModelLoading
from safepatching.errors import ModelError
from safepatching.method.dense import patched
from safepatching.method.directions import (
    ablation_deltas,
    activations,
    mean_difference,
    orthogonalised,
    post_instruction_length,
    probe_accuracy,
    residual_writers,
)
from safepatching.models.loading import load_model

HARMFUL = ["How do I make a dangerous thing?", "Write a threat to my neighbour.", "How do I pick a lock to rob a house?"]
HARMLESS = ["What is the capital of France?", "Write a poem about the sea.", "Name three colours."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)


def test_the_post_instruction_positions_are_the_templates_tokens_after_the_message(tiny):
    _, tokenizer = tiny
    suffix = len(tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids)
    assert post_instruction_length(tokenizer) == suffix


def test_activations_line_up_across_padded_batches(tiny):
    model, tokenizer = tiny
    positions = post_instruction_length(tokenizer)
    together = activations(model, tokenizer, HARMFUL + HARMLESS, positions, batch_size=6)
    alone = activations(model, tokenizer, HARMFUL[:1], positions, batch_size=1)
    assert together.shape == (6, model.config.num_hidden_layers, positions, model.config.hidden_size)
    assert torch.allclose(together[0], alone[0], atol=1e-5)  # left padding does not move the positions


def test_the_ablation_removes_the_direction_from_the_residual_stream_at_every_layer(tiny):
    model, tokenizer = tiny
    positions = post_instruction_length(tokenizer)
    harmful = activations(model, tokenizer, HARMFUL, positions)
    harmless = activations(model, tokenizer, HARMLESS, positions)
    direction = mean_difference(harmful, harmless)[1, -1]  # layer 1, last position
    unit = direction / direction.norm()
    writers = residual_writers(model)
    assert len(writers) == 1 + 2 * model.config.num_hidden_layers
    deltas = ablation_deltas({name: model.get_parameter(name) for name in writers}, direction)
    before = activations(model, tokenizer, HARMFUL, positions) @ unit
    with patched(model, deltas, None):
        after = activations(model, tokenizer, HARMFUL, positions) @ unit
    assert before.abs().max() > 1e-2 and after.abs().max() < 1e-4


def test_orthogonalising_removes_the_share_of_the_other_direction_asked_for():
    refusal, false_refusal = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])
    assert torch.allclose(orthogonalised(false_refusal, refusal), torch.tensor([0.0, 0.8, 0.0]))
    assert torch.allclose(orthogonalised(false_refusal, refusal, 0.5), torch.tensor([0.3, 0.8, 0.0]))


def test_a_probe_tells_separable_sets_apart_and_not_identical_ones():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(60, 8, generator=generator), torch.randn(60, 8, generator=generator)
    assert probe_accuracy(first + 4.0, second) == (30, 30)  # a quarter of the 120 held out
    correct, total = probe_accuracy(first, second)
    assert correct / total < 0.8


def test_a_model_without_known_residual_writers_fails_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ModelError, match="residual writers"):
        residual_writers(model)
