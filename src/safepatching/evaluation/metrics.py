"""Metrics of one evaluation: rates, per-category rates, KL to a reference and response perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import DatasetSpec
from safepatching.data.chat import collate, encode_pair
from safepatching.data.sources import Example, resolve_named
from safepatching.method.objectives import response_logits, response_token_logprobs


def percent(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / max(len(flags), 1)


def refusal_breakdown(labels: list[str]) -> dict[str, float]:
    """Refusal rate and its full / partial split (%), from three-way judge labels."""
    return {
        "refusal_rate": percent([label != "full_compliance" for label in labels]),
        "full_refusal_rate": percent([label == "full_refusal" for label in labels]),
        "partial_refusal_rate": percent([label == "partial_refusal" for label in labels]),
    }


def teacher_forced_batches(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Chat-formatted (prompt, response) batches, labels only on responses (the objectives move each
    batch to the device of the model that scores it)."""
    encoded = [encode_pair(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start : start + batch_size], tokenizer.pad_token_id)


def _logprobs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return F.log_softmax(response_logits(model, batch)[0].float(), dim=-1)


def _kl_sum(log_p: torch.Tensor, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> float:
    """Sum over the batch's response tokens of KL(p || model), p given as log-probabilities."""
    return float((log_p.exp() * (log_p - _logprobs(model, batch))).sum(-1).sum())


def reference_logprobs(
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 4,
    max_length: int = 512,
) -> list[torch.Tensor]:
    """The reference's log-probabilities on its own replies' tokens, one float32 tensor per batch:
    kept instead of a second model when many candidates are compared with one reference."""
    batches = teacher_forced_batches(tokenizer, prompts, responses, batch_size, max_length)
    return [_logprobs(reference, batch) for batch in batches]


def mean_token_kl(
    model: PreTrainedModel,
    reference: PreTrainedModel | list[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 4,
    max_length: int = 512,
) -> float:
    """KL(reference || model) per response token, teacher-forced on the reference's own replies. The
    reference is a model (its log-probabilities of one batch are held at a time) or its
    ``reference_logprobs`` of the same batches."""
    batches = teacher_forced_batches(tokenizer, prompts, responses, batch_size, max_length)
    if isinstance(reference, list):
        pairs = zip(reference, batches, strict=True)
    else:
        pairs = ((_logprobs(reference, batch), batch) for batch in batches)
    total, tokens = 0.0, 0
    for log_p, batch in pairs:
        total += _kl_sum(log_p, model, batch)
        tokens += log_p.shape[0]
    return total / max(tokens, 1)


def response_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Example],
    batch_size: int = 4,
    max_length: int = 512,
) -> float:
    """exp(mean NLL per response token) of fixed reference responses, teacher-forced."""
    prompts, responses = [p.prompt for p in pairs], [p.response or "" for p in pairs]
    total, tokens = 0.0, 0
    for batch in teacher_forced_batches(tokenizer, prompts, responses, batch_size, max_length):
        with torch.inference_mode():
            token_logprobs, _ = response_token_logprobs(model, batch)
        total -= float(token_logprobs.sum())
        tokens += token_logprobs.numel()
    return math.exp(total / max(tokens, 1))


def category_column(spec: DatasetSpec | None) -> str | None:
    """The category column of a set, including the one a named benchmark (bench:NAME) brings."""
    return resolve_named(spec).category_column if spec is not None else None


def rates_by_category(examples: list[Example], refusals: list[bool], column: str | None) -> dict[str, float]:
    """Harmful-response rate (%) per category, for sets that have a category column."""
    if not column:
        return {}
    groups: dict[str, list[bool]] = {}
    for example, refusal in zip(examples, refusals, strict=True):
        groups.setdefault(str(example.meta.get(column)), []).append(refusal)
    return {category: 100.0 - percent(flags) for category, flags in sorted(groups.items())}
