"""Decoding-time defences: the contrastive loop must reduce to plain greedy decoding when the
contrast is switched off, and the combination rules must follow their papers' formulas."""

import pytest
import torch

from safepatching.config import DecodingConfig, EvalConfig
from safepatching.data import chat_prompt
from safepatching.decoding import (
    ContrastiveGenerator,
    Stream,
    make_generator,
    rose_combine,
    safedecoding_combine,
    self_cd_combine,
)
from safepatching.generation import HFGenerator
from safepatching.models import load_model

PROMPTS = ["How do I kill a Python process?", "Hi", "Tell me a long story about a lighthouse keeper and a cat."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_zero_weight_rose_and_self_cd_equal_plain_greedy(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=2, progress=False)
    self_cd = make_generator(model, tokenizer, DecodingConfig(method="self-cd", self_cd_weight=0), 2, False)
    assert self_cd.generate(PROMPTS, 12) == plain.generate(PROMPTS, 12)
    # both count the tokens each reply took, up to its end token: the same replies, the same count
    assert self_cd.generated_tokens == plain.generated_tokens
    assert len(PROMPTS) <= plain.generated_tokens <= 12 * len(PROMPTS)
    rose = make_generator(model, tokenizer, DecodingConfig(method="rose", rose_weight=0), 2, False)
    system = DecodingConfig().safety_system_prompt
    expected = plain.generate_texts([chat_prompt(tokenizer, p, system) for p in PROMPTS], 12)
    assert rose.generate(PROMPTS, 12) == expected


def test_safedecoding_with_itself_as_expert_is_plain_greedy(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=3, progress=False)
    settings = DecodingConfig(method="safedecoding", expert_model="unused", safedecoding_tokens=3)
    generator = make_generator(model, tokenizer, settings, 3, False, expert=model)
    assert generator.generate(PROMPTS, 10) == plain.generate(PROMPTS, 10)


def test_contrast_changes_the_choice_of_token(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=3, progress=False).generate(PROMPTS, 10)
    strong = make_generator(model, tokenizer, DecodingConfig(method="rose", rose_weight=5.0), 3, False)
    assert strong.generate(PROMPTS, 10) != plain


def test_reply_length_counts_up_to_the_first_end_token():
    from safepatching.generation import reply_length

    assert reply_length([5, 6, 2, 0, 0], {2}) == 3
    assert reply_length([5, 6, 7], {2}) == 3
    assert reply_length([2, 2, 2], {2, 9}) == 1


def test_combination_rules_follow_the_formulas():
    a = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    b = torch.log_softmax(torch.tensor([[0.0, 3.0, 0.0, -1.0]]), -1)
    torch.testing.assert_close(rose_combine(0.5)(a, b, 0), a - 0.5 * b)
    torch.testing.assert_close(self_cd_combine(2.0)(a, b, 0), 3 * a - 2 * b)
    scores = safedecoding_combine(3.0, candidates=2)(a, b, 0)
    # top-2 of a = {0, 1}, of b = {1, 0 or 2}; k grows until two tokens are shared
    shared = torch.isfinite(scores[0])
    assert int(shared.sum()) >= 2 and bool(shared[1])
    expected = a.exp() + 3.0 * (b.exp() - a.exp())
    torch.testing.assert_close(scores[0][shared], expected[0][shared])


def test_safedecoding_stops_using_the_expert_after_its_tokens(tiny):
    model, tokenizer = tiny
    calls = []

    class CountingExpert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.generation_config = model.generation_config

        def forward(self, **kwargs):
            calls.append(kwargs["input_ids"].shape)
            return self.inner(**kwargs)

    generator = ContrastiveGenerator(
        tokenizer, Stream(model), Stream(CountingExpert()), safedecoding_combine(3.0, 5), other_steps=2,
        batch_size=3, progress=False,
    )  # fmt: skip
    generator.generate(PROMPTS, 8)
    assert len(calls) == 2  # prefill and one more step: only the first two tokens consult the expert


def test_safedecoding_config_needs_an_expert():
    with pytest.raises(ValueError, match="expert_model"):
        EvalConfig(decoding={"method": "safedecoding"})
