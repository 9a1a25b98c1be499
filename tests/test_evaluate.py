"""Evaluation metrics computed by hand on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from safepatching.data import Example, collate, encode_pair
from safepatching.derive import response_nll
from safepatching.evaluate import response_perplexity
from safepatching.models import load_model


def test_response_perplexity_is_exp_of_token_weighted_nll(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    pairs = [Example("Hi?", "Hello there."), Example("Capital of France?", "Paris is the capital, of course."),
             Example("Poem?", "The sea and the sky.")]  # fmt: skip
    total, tokens = 0.0, 0
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair.prompt, pair.response, 512)
        with torch.no_grad():
            nll = float(response_nll(model, collate([encoded], tokenizer.pad_token_id)))
        count = sum(label != -100 for label in encoded["labels"]) - (encoded["labels"][0] != -100)
        total, tokens = total + nll * count, tokens + count
    assert response_perplexity(model, tokenizer, pairs, batch_size=2) == pytest.approx(
        math.exp(total / tokens), rel=1e-4
    )
