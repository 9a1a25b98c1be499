"""Train/evaluation separation: prompts are compared after normalisation, and overlap is refused or dropped."""

from __future__ import annotations

import logging

from safepatching.data.sources import Example, normalise_prompt
from safepatching.errors import DataError

log = logging.getLogger(__name__)


def drop_overlap(train: list[Example], evaluation: dict[str, list[Example]], what: str = "training pairs") -> list[Example]:
    """The training examples whose prompt no evaluation set holds."""
    held = {normalise_prompt(e.prompt) for examples in evaluation.values() for e in examples}
    kept = [e for e in train if normalise_prompt(e.prompt) not in held]
    if not kept:
        raise DataError("every training prompt also occurs in an evaluation set.", "use other training data")
    if len(kept) < len(train):
        log.warning(
            "dropped %d of %d %s whose prompt an evaluation set holds", len(train) - len(kept), len(train), what
        )
    return kept


def assert_disjoint(
    train: list[Example], evaluation: dict[str, list[Example]], against: str = "training pairs"
) -> None:
    """Refuse to evaluate on prompts that the patches were derived from (or, for validation sets, that
    a reported set holds)."""
    seen = {normalise_prompt(e.prompt) for e in train}
    for name, examples in evaluation.items():
        overlap = [e.prompt for e in examples if normalise_prompt(e.prompt) in seen]
        if overlap:
            raise DataError(
                f"{len(overlap)} {name} evaluation prompt(s) also occur in the {against}, e.g. {overlap[0][:60]!r}.",
                "use disjoint splits (same shuffle_seed, non-overlapping slices)",
            )
