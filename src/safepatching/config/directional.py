"""Settings of directional patches: static weight edits from residual-stream directions (see
docs/method.md, "Directional patches").

Three edits, each off at scale 0:

- ``ablate`` (Surgical false-refusal ablation): the false-refusal direction v of ``ablate_layer``,
  less ``strength`` times its component along the refusal direction r, is projected out of every
  residual writer;
- ``add`` (the control): the refusal direction r of ``add_layer`` is amplified by ``add_scale`` in
  every residual writer;
- ``align`` (LLM-VA): in the ``align_sublayers`` attention and MLP outputs where the model's answers
  and the prompts' harm are best told apart, what the writer writes along its answer direction is
  replaced by its benign component, rescaled (one rank-1 rewrite per sublayer).

Any of them may be on at once (e.g. an over-refusal layer and a safety layer); their deltas add.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from safepatching.config.datasets import DatasetSpec, StrictModel
from safepatching.config.identity import ADDED_LATER


def shipped_prompts(path: str, description: str, split: str = "train", shuffle_seed: int | None = None):
    """A direction set's default: a JSON file of the data directory with its prompts under ``instruction``."""
    spec = {"source": f"data:{path}", "prompt_column": "instruction", "split": split, "shuffle_seed": shuffle_seed}
    return Field(default_factory=lambda: DatasetSpec(**spec), description=description)


class DirectionSets(StrictModel):
    """The three prompt sets directions are taken from; none may hold an evaluated or validation prompt."""

    harmful: DatasetSpec = shipped_prompts(
        "harmful_prompts_extra/refusal_direction_splits/harmful_train.json",
        "prompts the model should refuse (r = mean(harmful) - mean(harmless))",
    )
    harmless: DatasetSpec = shipped_prompts(
        "harmful_prompts_extra/refusal_direction_splits/harmless_train.json",
        "plainly harmless prompts, the common reference of both directions",
        "train[:300]",
        0,
    )
    benign: DatasetSpec = shipped_prompts(
        "over_refusal/or_bench/or_bench_hard_train.json",
        "benign prompts that sound harmful (v = mean(benign) - mean(harmless)); OR-Bench-Hard's train split",
        "train[:200]",
        0,
    )
    benign_refused_only: bool = Field(
        False,
        description="keep only the benign prompts the backbone refuses (Surgical's rule), judged by "
        "eval.refusal_judge on a reply of refusal_max_new_tokens",
    )
    refusal_max_new_tokens: int = Field(
        48, ge=1, description="reply budget of the refusal checks (that filter, and align's answered/refused labels)"
    )
    drop_held_out: bool = Field(
        False,
        description="drop the prompts an evaluation or validation set holds (the shipped harmful set shares some "
        "with AdvBench) instead of refusing the run",
    )


class DirectionalConfig(StrictModel):
    """Directional edits added to the merged patches (all off by default)."""

    ablate_scale: float = Field(
        0.0, ge=0, le=2, description="share of the orthogonalised false-refusal direction removed (0: off, 1: all)"
    )
    ablate_layer: int = Field(12, ge=0, description="the layer whose false-refusal direction is ablated")
    strength: float = Field(
        1.0, ge=0, le=1, description="lambda: share of the refusal component taken out of v before it is ablated"
    )
    add_scale: float = Field(0.0, ge=-1, le=4, description="gamma: amplification of the refusal direction (0: off)")
    add_layer: int = Field(12, ge=0, description="the layer whose refusal direction is amplified")
    position: int = Field(
        -1, le=-1, description="post-instruction position the directions are taken at (-1: the last template token)"
    )
    embedding: Literal["auto", "edit", "skip"] = Field(
        "auto",
        description="edit the input embedding too; auto: unless it is tied to the output layer (an edit there "
        "would also change every logit)",
    )
    align_scale: float = Field(
        0.0, ge=0, le=2, json_schema_extra=ADDED_LATER,
        description="share of LLM-VA's answer-to-benign rewrite applied (0: off, 1: the paper's rewrite)",
    )  # fmt: skip
    align_sublayers: int = Field(
        8,
        ge=1,
        json_schema_extra=ADDED_LATER,
        description="how many attention/MLP outputs align rewrites: those whose answered/refused and "
        "benign/harmful probes are both most accurate on held-out prompts",
    )
    align_iterations: int = Field(
        1,
        ge=1,
        le=8,
        json_schema_extra=ADDED_LATER,
        description="LLM-VA's iteration: each round probes the model as the earlier rounds left it and adds its "
        "rewrite; the count is a tune knob, so the study keeps the round that validates best",
    )
    sets: DirectionSets = Field(default_factory=DirectionSets)
    batch_size: int = Field(8, ge=1, json_schema_extra=ADDED_LATER, description="prompts per activation pass")

    @property
    def active(self) -> bool:
        return self.ablate_scale != 0 or self.add_scale != 0 or self.align_scale != 0
