"""The data a run trains and reports on, read once and checked apart: the harmful pairs, the
over-safety prompts and the evaluation sets.

Nothing here loads a model, except a model judge that filters the harmful pairs when asked to.
"""

from __future__ import annotations

import logging

from safepatching.config.settings import PipelineConfig
from safepatching.data.eval_sets import EvalSets, load_eval_sets
from safepatching.data.overlap import assert_disjoint, drop_overlap
from safepatching.data.sources import Example, load_examples, load_pairs
from safepatching.errors import DataError
from safepatching.evaluation.judges.registry import Judges, judge_all

log = logging.getLogger(__name__)


class TrainingData:
    """``held_out`` names further sets (a study's validation sets) whose prompts ``drop_eval_overlap``
    keeps out of the harmful pairs, like the evaluation sets."""

    def __init__(self, config: PipelineConfig, judges: Judges, held_out: dict[str, list[Example]] | None = None):
        self.config, self.judges, self.held_out = config, judges, held_out or {}
        if config.harmful_train_judge:  # an unknown judge fails here, before any work
            judges.check(config.harmful_train_judge)
        self._pairs: list[Example] | None = None

    def with_config(self, config: PipelineConfig) -> TrainingData:
        """The data of a candidate's settings (a study's trial): its harmful pairs are these when the
        settings that choose them agree, so they are read and judged once per study."""
        other = TrainingData(config, self.judges, self.held_out)
        if harmful_side(config) == harmful_side(self.config):
            other._pairs = self.harmful_pairs()
        return other

    def harmful_pairs(self) -> list[Example]:
        """The pairs the patches are derived from: every harmful_train source, less (when asked) the
        prompts an evaluation or held-out set holds, less (when asked) the responses a judge finds
        not compliant."""
        if self._pairs is None:
            c = self.config
            pairs = load_pairs(c.harmful_train_specs(), c.data_dir)
            if c.drop_eval_overlap:
                evaluated = load_eval_sets(c.eval, c.data_dir).named()
                held = {
                    **{f"eval {n}": s for n, s in evaluated.items()},
                    **{f"held-out {n}": s for n, s in self.held_out.items()},
                }
                pairs = drop_overlap(pairs, held)
            if c.harmful_train_judge:
                pairs = self._complying(pairs)
            self._pairs = pairs
        return self._pairs

    def _complying(self, pairs: list[Example]) -> list[Example]:
        """The pairs whose response ``harmful_train_judge`` finds fully compliant (a refusal or a
        hedged answer teaches ascent to unlearn the wrong thing)."""
        name = self.config.harmful_train_judge
        verdicts = judge_all(self.judges(name), [e.prompt for e in pairs], [e.response or "" for e in pairs])
        kept = [e for e, v in zip(pairs, verdicts, strict=True) if not v.refusal]
        if not kept:
            raise DataError(
                f"judge {name} finds none of the {len(pairs)} training responses compliant.",
                "check response_column, or set harmful_train_judge: null for curated pairs",
            )
        log.warning(
            "harmful_train_judge %s kept %d of %d training pairs (dropped %d refusing or partial responses)",
            name,
            len(kept),
            len(pairs),
            len(pairs) - len(kept),
        )
        return kept

    def over_safety_prompts(self) -> list[Example]:
        """The over-safety training prompts as the data gives them (replies, if any, not yet made)."""
        spec = self.config.over_safety.train
        return [] if spec is None else load_examples(spec, self.config.data_dir)

    def eval_sets(self, pairs: list[Example]) -> EvalSets:
        """The evaluation sets, refused when they share a prompt with the training pairs (the harmful
        pairs and the over-safety prompts)."""
        sets = load_eval_sets(self.config.eval, self.config.data_dir)
        assert_disjoint(pairs, sets.named())
        assert_disjoint(self.over_safety_prompts(), sets.named(), against="over_safety.train")
        return sets


def harmful_side(config: PipelineConfig) -> tuple:
    """The settings the harmful pairs depend on."""
    return (
        config.harmful_train_specs(),
        config.drop_eval_overlap,
        config.harmful_train_judge,
        config.eval.model_dump(),
        config.data_dir,
    )
