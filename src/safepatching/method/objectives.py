"""Training objectives on response tokens: NLL, summed log-probabilities and the NPO loss.

Only response positions carry a loss, so the output projection is applied to their hidden states
alone: on short pairs with a large vocabulary (152k for Qwen2.5) the logits of the prompt tokens
would be most of the work and memory of a step. Models whose logits are more than a plain
projection of the decoder's last hidden state (e.g. soft-capped) take the full forward pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from safepatching.data.chat import IGNORE_INDEX


def autocast(model: torch.nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for a float32 model: matrix work in ``dtype``, master weights untouched."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def _sliceable(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    plain = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
    return plain and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token (one row each) and those tokens."""
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _sliceable(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1][scored]
        return model.get_output_embeddings()(hidden), targets[scored]
    return model(**inputs).logits[:, :-1][scored], targets[scored]


def response_token_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every response token (a flat vector) and the mask of their positions."""
    logits, targets = response_logits(model, batch)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), batch["labels"][:, 1:] != IGNORE_INDEX


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token (prompt tokens carry no loss)."""
    logits, targets = response_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each example's response tokens, and how many there are."""
    token_logprobs, scored = response_token_logprobs(model, batch)
    per_position = torch.zeros(scored.shape, dtype=token_logprobs.dtype, device=token_logprobs.device)
    per_position[scored] = token_logprobs
    return per_position.sum(-1), scored.sum(-1)


def npo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The NPO loss of a batch and its mean response NLL per token (for logging and the stop rule)."""
    logprobs, counts = response_logprobs(model, batch)
    loss = -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (logprobs - batch["reference_logprobs"])).mean()
    return loss, -logprobs.sum() / counts.sum()
