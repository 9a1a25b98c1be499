"""What each stage's cached output depends on, as pure functions of the settings (and, where the
training data is filtered by content, of the pairs themselves).

A stage is reused while its key is unchanged (``storage.cache.cached``). The keys are part of the
run folder's format: a change here orphans every cached stage, so ``tests/test_cache_keys.py``
holds keys written by earlier versions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from safepatching.config.identity import cache_identity
from safepatching.config.settings import PipelineConfig
from safepatching.data.sources import Example
from safepatching.storage.cache import fingerprint


@dataclass(frozen=True)
class StageKeys:
    """The keys of one config's stages. ``base_state`` names weights other than the backbone's files
    (continual PSA's earlier rounds); ``harmful_pairs`` is asked only when the pairs are keyed by
    content."""

    config: PipelineConfig
    compute_dtype: str
    harmful_pairs: Callable[[], list[Example]]
    base_state: str | None = None

    def derive(self, label: str = "safety") -> str:
        """What a patch is derived from; the over-safety patch's data joins when it has its own."""
        c = self.config
        parts = [c.model, c.seed, self.compute_dtype, c.harmful_train, cache_identity(c.derive)]
        if c.harmful_train_extra or c.drop_eval_overlap or c.harmful_train_judge:  # keyed by content: what is
            # dropped depends on the evaluation sets and the judge
            parts.append([(e.prompt, e.response) for e in self.harmful_pairs()])
        key = fingerprint(*parts, *([self.base_state] if self.base_state else []))
        if label == "over_safety" and c.over_safety.train is not None:
            key = fingerprint(key, "over_safety_train", self.replies())  # the tag the first keys used
        return key

    def replies(self) -> str:
        """What the over-safety training pairs depend on: the prompts and who answers them, and how."""
        c = self.config
        data = c.over_safety
        if data.train.response_column:
            return fingerprint(data.train)
        answerer = data.replies.model or self.derive("over_safety_paper")
        return fingerprint(data.train, data.replies, answerer, c.eval.refusal_judge)

    def own_replies(self, prompts: list[str]) -> str:
        """The weights replying (the backbone, or it after earlier rounds) and what they are asked."""
        c = self.config
        return fingerprint(c.model, self.compute_dtype, prompts, c.importance.own_reply_tokens, self.base_state)

    def importance(self) -> str:
        c = self.config
        if c.over_safety.train is None:
            return fingerprint(self.derive(), cache_identity(c.importance))
        return fingerprint(self.derive(), self.derive("over_safety"), cache_identity(c.importance))

    def merge(self) -> str:
        """The merged model: its patches, the merge settings and, when on, the directional edit."""
        directional = self.config.directional
        edit = [cache_identity(directional)] if directional.active else []
        return fingerprint(self.importance(), cache_identity(self.config.merge), *edit)

    def backbone_eval(self) -> str:
        c = self.config
        return fingerprint(c.model, self.compute_dtype, cache_identity(c.eval), c.data_dir)

    def patched_eval(self) -> str:
        return fingerprint(self.backbone_eval(), self.merge())
