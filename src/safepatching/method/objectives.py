"""Training objectives on response tokens: NLL, summed log-probabilities and the NPO loss.

Only response positions carry a loss, so the output projection is applied to their hidden states
alone: on short pairs with a large vocabulary (152k for Qwen2.5) the logits of the prompt tokens
would be most of the work and memory of a step. Models whose logits are more than a plain
projection of the decoder's last hidden state (e.g. soft-capped) take the full forward pass.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from safepatching.data.chat import IGNORE_INDEX


def autocast(model: torch.nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for a float32 model: matrix work in ``dtype``, master weights untouched.

    The cast copies of the weights are not cached: each weight is used once per forward pass, and a
    cache would hold a low-precision copy of every weight until the pass ends, which recomputed
    activations (``derive.recompute_activations``) otherwise avoid keeping."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


def _sliceable(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    plain = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
    return plain and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


LOGIT_ROWS = 128  # response positions projected onto the vocabulary at a time, by default
_logit_rows: contextvars.ContextVar[int] = contextvars.ContextVar("logit_rows", default=LOGIT_ROWS)


@contextlib.contextmanager
def logit_rows(rows: int):
    """Project ``rows`` response positions at a time while the block runs (0: all in one pass, kept
    for the backward pass instead of recomputed: faster where memory is plenty, as on a GPU)."""
    token = _logit_rows.set(rows)
    try:
        yield
    finally:
        _logit_rows.reset(token)


def _response_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """(rows, targets, projection) for the positions that predict a response token: the decoder's
    hidden states and the output projection that turns them into logits, or (for models whose logits
    are more than that projection) the logits themselves and None."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}  # a no-op for batches already there
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if _sliceable(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1][scored]
        return hidden, targets[scored], model.get_output_embeddings()
    return model(**inputs).logits[:, :-1][scored], targets[scored], None


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token (one row each) and those tokens."""
    rows, targets, projection = _response_rows(model, batch)
    return (rows if projection is None else projection(rows)), targets


def _target_logprobs(rows: torch.Tensor, targets: torch.Tensor, projection) -> torch.Tensor:
    """log p(target) of each row, ``logit_rows`` rows at a time (LOGIT_ROWS by default). With
    gradients, a chunk's logits are recomputed in the backward pass rather than kept: a
    vocabulary-wide float32 row per response token was the largest part of a training step's memory."""

    project = _cast_once(projection, rows.device.type)

    def chunk(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        logits = part if project is None else project(part)
        return -F.cross_entropy(logits.float(), part_targets, reduction="none")

    per_chunk = _logit_rows.get()
    if per_chunk == 0:
        return chunk(rows, targets)
    recompute = projection is not None and torch.is_grad_enabled()
    parts = [
        checkpoint(chunk, part, part_targets, use_reentrant=False) if recompute else chunk(part, part_targets)
        for part, part_targets in zip(rows.split(per_chunk), targets.split(per_chunk), strict=True)
    ]
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)


def _cast_once(projection, device: str):
    """The output projection with its weight cast to the autocast dtype once for all chunks. Autocast
    (which keeps no cast cache, see ``autocast``) would otherwise copy the vocabulary-wide weight
    again for each chunk and for each chunk's recomputation."""
    if type(projection) is not torch.nn.Linear or not torch.is_autocast_enabled(device):  # a subclass may project otherwise
        return projection
    dtype = torch.get_autocast_dtype(device)
    weight = projection.weight.to(dtype)
    bias = None if projection.bias is None else projection.bias.to(dtype)
    return lambda part: F.linear(part, weight, bias)


def response_token_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every response token (a flat vector) and the mask of their positions."""
    rows, targets, projection = _response_rows(model, batch)
    return _target_logprobs(rows, targets, projection), batch["labels"][:, 1:] != IGNORE_INDEX


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token (prompt tokens carry no loss)."""
    token_logprobs, _ = response_token_logprobs(model, batch)
    return -token_logprobs.mean()


def response_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each example's response tokens, and how many there are."""
    token_logprobs, scored = response_token_logprobs(model, batch)
    per_position = torch.zeros(scored.shape, dtype=token_logprobs.dtype, device=token_logprobs.device)
    per_position[scored] = token_logprobs
    return per_position.sum(-1), scored.sum(-1)


def response_nlls(model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """The mean NLL per response token of each run of ``batch_size`` rows: the loss of every batch
    that shares this forward pass, each as ``response_nll`` gives it alone."""
    token_logprobs, scored = response_token_logprobs(model, batch)
    per_row = scored.sum(-1).tolist()  # one device sync per pass, not one per batch
    tokens = [sum(per_row[start : start + batch_size]) for start in range(0, len(per_row), batch_size)]
    return -torch.stack([part.mean() for part in token_logprobs.split(tokens)])


def npo_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The NPO loss and the mean response NLL per token (for logging and the stop rule) of each run
    of ``batch_size`` rows, as ``response_nlls`` splits them."""
    logprobs, counts = response_logprobs(model, batch)
    reference = batch["reference_logprobs"].to(logprobs.device)  # a no-op for batches already there
    terms = -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * (logprobs - reference))
    losses = torch.stack([part.mean() for part in terms.split(batch_size)])
    parts = zip(logprobs.split(batch_size), counts.split(batch_size), strict=True)
    return losses, torch.stack([-part.sum() / count.sum() for part, count in parts])
