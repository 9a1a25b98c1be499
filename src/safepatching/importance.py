"""SNIP importance |w * dL/dw| and the top-a% / top-b% regions it defines.

The loss is the response NLL of the harmful pairs (the objective the patches were derived from),
evaluated at the patched model (backbone + safety patch, or backbone + over-safety patch).
Scores are the mean over batches of the per-batch |w * grad|.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config import ImportanceConfig
from safepatching.data import Example
from safepatching.derive import make_loader, response_nll
from safepatching.merge import top_threshold


def add_deltas(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add each delta to the model's weight of that name, in the weight's dtype."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(params[name].dtype))


@contextlib.contextmanager
def patched(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Temporarily add a patch's deltas to the model's weights, restoring them exactly afterwards."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in deltas}
    add_deltas(model, deltas)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def snip_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Example],
    names: list[str],
    settings: ImportanceConfig,
    desc: str = "importance",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean per-batch |w * dNLL/dw| for the named parameters."""
    pairs = pairs[: settings.max_examples]
    loader = make_loader(tokenizer, pairs, settings.max_length, settings.batch_size, seed=0, shuffle=False)
    params = dict(model.named_parameters())
    selected = set(names)
    for name, param in params.items():
        param.requires_grad_(name in selected)
    scores = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            response_nll(model, batch).backward()
            with torch.no_grad():
                for name in names:
                    param = params[name]
                    scores[name].add_((param.detach() * param.grad).abs().float())
                    param.grad = None
    finally:
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    for score in scores.values():
        score.div_(len(loader))
    return scores


def _kth_largest(values: torch.Tensor, percent: float) -> torch.Tensor:
    return top_threshold(values, max(1, math.ceil(values.numel() * percent / 100)))


def global_threshold(scores: Mapping[str, torch.Tensor], percent: float) -> torch.Tensor:
    """The score of the top ``percent`` % entry over all tensors together (needs every score at once)."""
    return _kth_largest(torch.cat([scores[name].reshape(-1).float() for name in scores]), percent)


def region_mask(score: torch.Tensor, percent: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Entries at or above the threshold (this tensor's own top ``percent`` % when none is given).

    Entries tied with the threshold are all kept; entries with score 0 are never kept.
    """
    if threshold is None:
        threshold = _kth_largest(score, percent)
    return (score >= threshold) & (score > 0)


def top_region(
    scores: Mapping[str, torch.Tensor], percent: float, scope: str = "per_tensor"
) -> dict[str, torch.Tensor]:
    """Boolean masks of the top ``percent`` % entries by score, per tensor or over all tensors."""
    threshold = global_threshold(scores, percent) if scope == "global" else None
    return {name: region_mask(scores[name], percent, threshold) for name in scores}
