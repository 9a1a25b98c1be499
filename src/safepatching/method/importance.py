"""SNIP importance |w * dL/dw| and the top-a% / top-b% regions it defines.

The loss is the response NLL of the harmful pairs (the objective the patches were derived from),
evaluated at the patched model (backbone + safety patch, or backbone + over-safety patch); the
``loss_on`` setting moves it to the questions' tokens, or to the backbone's own replies (given as
the pairs' responses by the caller).
Scores are the mean over batches of the per-batch |w * grad|.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import ImportanceConfig
from safepatching.data.sources import Example
from safepatching.method.derive import make_loader
from safepatching.method.objectives import autocast, response_nll
from safepatching.models.precision import DTYPES


def snip_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Example],
    names: list[str],
    settings: ImportanceConfig,
    desc: str = "importance",
    progress: bool = True,
    compute_dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """Mean per-batch |w * dNLL/dw| for the named parameters (float32 weights and gradients; the
    forward pass under autocast in ``compute_dtype``), in CPU memory."""
    pairs = pairs[: settings.max_examples]
    on_questions = settings.loss_on == "questions"
    loader = make_loader(
        tokenizer,
        pairs,
        settings.max_length,
        settings.batch_size,
        seed=0,
        shuffle=False,
        loss_on_questions=on_questions,
    )
    params = dict(model.named_parameters())
    selected = set(names)
    for name, param in params.items():
        param.requires_grad_(name in selected)
    scores = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}

    def fold(name: str):
        """Each gradient joins its score as soon as backward finishes it and is freed at once, so no
        full set of gradients exists (GBs on the 1.5B backbone)."""

        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                scores[name].add_((param.detach() * param.grad).abs().float())
            param.grad = None

        return hook

    handles = [params[name].register_post_accumulate_grad_hook(fold(name)) for name in names]
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress):
            with autocast(model, DTYPES[compute_dtype]):
                loss = response_nll(model, batch)
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    for score in scores.values():
        score.div_(len(loader))  # in place: a second copy of every score would be GBs
    return {name: score.cpu() for name, score in scores.items()}  # beside the patches' deltas
