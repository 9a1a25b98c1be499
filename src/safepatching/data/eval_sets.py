"""The prompt sets one evaluation reads: harmful, benign-but-scary, harmless and the further benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safepatching.config.settings import EvalConfig
from safepatching.data.sources import Example, load_examples


@dataclass
class EvalSets:
    harmful: list[Example]
    benign: list[Example]
    harmless: list[Example]
    perplexity: list[Example] = field(default_factory=list)
    safety: dict[str, list[Example]] = field(default_factory=dict)
    over_safety: dict[str, list[Example]] = field(default_factory=dict)

    def named(self) -> dict[str, list[Example]]:
        """Every prompt set by name, for the train/eval overlap check."""
        sets = {"harmful": self.harmful, "benign": self.benign, "harmless": self.harmless}
        sets.update({f"safety/{name}": examples for name, examples in self.safety.items()})
        return {**sets, **{f"over_safety/{name}": examples for name, examples in self.over_safety.items()}}


def load_eval_sets(settings: EvalConfig, data_dir: Path | None) -> EvalSets:
    limit = settings.max_examples
    return EvalSets(
        harmful=load_examples(settings.harmful, data_dir, limit),
        benign=load_examples(settings.benign, data_dir, limit),
        harmless=load_examples(settings.harmless, data_dir, limit),
        perplexity=load_examples(settings.perplexity, data_dir, limit) if settings.perplexity else [],
        safety={name: load_examples(spec, data_dir, limit) for name, spec in settings.safety_benchmarks.items()},
        over_safety={
            name: load_examples(spec, data_dir, limit) for name, spec in settings.over_safety_benchmarks.items()
        },
    )
