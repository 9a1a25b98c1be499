"""Training objectives on response tokens: NLL, summed log-probabilities and the NPO loss."""

from __future__ import annotations

import torch

from safepatching.data.chat import IGNORE_INDEX


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token (prompt tokens carry no loss)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each example's response tokens, and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE_INDEX
    token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    return (token_logprobs.squeeze(-1) * scored).sum(-1), scored.sum(-1)


def npo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The NPO loss of a batch and its mean response NLL per token (for logging and the stop rule)."""
    logprobs, counts = response_logprobs(model, batch)
    loss = -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (logprobs - batch["reference_logprobs"])).mean()
    return loss, -logprobs.sum() / counts.sum()
