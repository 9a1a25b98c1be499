"""Patch derivations behind a small registry, as merge methods are: each turns a backbone and its
training pairs into a dense patch.

The stages look a derivation up by name and give it a ``DerivationInputs``; a new patch family
(e.g. static edits from activation directions) registers one entry and needs no new branch in the
stages. ``trains`` tells the stages whether the derivation fine-tunes the float32 master (then the
memory check runs before it is loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import DeriveConfig
from safepatching.data.sources import Example
from safepatching.method.dense import DensePatch
from safepatching.method.derive import derive_patch


@dataclass(frozen=True)
class DerivationInputs:
    """Everything a derivation may use: the float32 master, the pairs and the run's settings."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    pairs: list[Example]
    settings: DeriveConfig
    seed: int
    progress: bool
    checkpoint_dir: Path | None
    compute_dtype: str
    base: Callable[[str], torch.Tensor] | None  # the untrained weights, read from the backbone's files


@dataclass(frozen=True)
class Derivation:
    function: Callable[[DerivationInputs], DensePatch]
    trains: bool
    description: str


DERIVATIONS: dict[str, Derivation] = {}


def register_derivation(name: str, description: str, trains: bool = True):
    def decorator(function: Callable[[DerivationInputs], DensePatch]):
        DERIVATIONS[name] = Derivation(function, trains, description)
        return function

    return decorator


def fine_tuned(direction: str) -> Callable[[DerivationInputs], DensePatch]:
    """A derivation that fine-tunes in ``direction`` (see ``method.derive``)."""

    def derive(given: DerivationInputs) -> DensePatch:
        return derive_patch(
            given.model,
            given.tokenizer,
            given.pairs,
            direction,
            given.settings,
            given.seed,
            given.progress,
            given.checkpoint_dir,
            given.compute_dtype,
            given.base,
        )

    return derive


register_derivation("ascent", "gradient ascent on the response NLL: the paper's safety patch")(fine_tuned("ascent"))
register_derivation("descent", "gradient descent on the response NLL: the paper's over-safety patch")(
    fine_tuned("descent")
)
register_derivation("npo", "negative preference optimisation: the bounded alternative to ascent")(fine_tuned("npo"))
