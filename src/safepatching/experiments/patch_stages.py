"""The patch stages of one setting: derive (through the derivation registry) and SNIP importance.

They run over a backbone host and training data that may be shared: a run's own, or a study's
float32 master and data, which every candidate's patch stages reuse (nothing is loaded or read
when one is made). Each stage is cached under ``config.output_dir`` by its key (``StageKeys``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safepatching.config.settings import ModelLoading, PipelineConfig
from safepatching.data.sources import Example
from safepatching.evaluation.judges.registry import Judges
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.keys import StageKeys
from safepatching.experiments.replies import over_safety_replies, own_reply_pairs
from safepatching.experiments.training_data import TrainingData
from safepatching.method.dense import DensePatch, checkpoint_dir_for, load_dense_patch, patched, save_dense_patch
from safepatching.method.derivations import DERIVATIONS, DerivationInputs
from safepatching.method.importance import snip_scores
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.storage.cache import cached, recorded_wall_seconds, stage_is_fresh, stage_meter
from safepatching.storage.files import link_dir, save_tensors
from safepatching.storage.shards import LazyTensors

log = logging.getLogger(__name__)
SCORE_LABELS = ("safety", "over_safety")


@dataclass
class PatchStages:
    """Derivation and importance of ``config`` over ``backbone`` and ``data``; ``meter`` collects each
    computed stage's wall time and peak memory. ``shared_patches`` is another run's output folder: a
    patch it derived under the same settings is linked from it instead of derived again (a study
    candidate that changes only the over-safety data keeps the safety patch)."""

    config: PipelineConfig
    backbone: Backbone
    data: TrainingData
    judges: Judges
    keys: StageKeys
    progress: bool = True
    meter: dict[str, Any] = field(default_factory=dict)
    shared_patches: Path | None = None
    _over_safety_pairs: list[Example] | None = field(default=None, init=False, repr=False)

    @classmethod
    def over(cls, config: PipelineConfig, backbone: Backbone, data: TrainingData, judges: Judges, **options):
        """The patch stages of ``config`` over a shared host and data (its keys made from them)."""
        data = data.with_config(config)
        keys = StageKeys(config, backbone.compute_dtype, data.harmful_pairs)
        return cls(config, backbone, data, judges, keys, **options)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def loading(self) -> ModelLoading:
        return self.backbone.loading

    def over_safety_pairs(self, pairs: list[Example]) -> list[Example]:
        """What the over-safety patch descends on: the harmful pairs (the paper), or over_safety.train
        with its own replies or replies generated, judged and cached under over_safety_replies/."""
        spec = self.config.over_safety.train
        if spec is None:
            return pairs
        if self._over_safety_pairs is None:
            if spec.response_column:
                self._over_safety_pairs = self.data.over_safety_prompts()
            else:
                self._over_safety_pairs = over_safety_replies(self, pairs)
        return self._over_safety_pairs

    def training_pairs(self, label: str, pairs: list[Example]) -> list[Example]:
        """What the patch of ``label`` descends or ascends on: its own data for the over-safety patch."""
        return self.over_safety_pairs(pairs) if label == "over_safety" else pairs

    def derive(self, pairs: list[Example]) -> tuple[DensePatch, DensePatch]:
        return self.derive_one(pairs, "safety", self.config.derive.unlearning), self.derive_over_safety(pairs)

    def derive_over_safety(self, pairs: list[Example]) -> DensePatch:
        """The over-safety patch: descent on the config's over-safety data (the harmful pairs by default)."""
        return self.derive_one(self.training_pairs("over_safety", pairs), "over_safety", "descent")

    def derive_one(
        self, pairs: list[Example], label: str, derivation: str, directory: Path | None = None, refresh=False
    ) -> DensePatch:
        """One dense patch made by the registered ``derivation``, saved under ``directory`` (default
        patches/<label>) and reused while its settings have not changed (unless ``refresh``)."""
        directory = Path(directory) if directory is not None else self.out / "patches" / label
        method = DERIVATIONS[derivation]

        def produce() -> DensePatch:
            if method.trains and not self.backbone.loaded:
                self.backbone.check_training_fits(self.config.derive, self.config.importance)
            model, tokenizer = self.backbone.model(training=method.trains)
            patch = method.function(
                DerivationInputs(
                    model,
                    tokenizer,
                    pairs,
                    self.config.derive,
                    self.config.seed,
                    self.progress,
                    checkpoint_dir_for(directory),
                    self.backbone.compute_dtype,
                    self.backbone.base_weight,  # used only where the model still holds the files' weights
                )
            )
            save_dense_patch(patch, directory, {"label": label, "base_model": self.config.model})
            return load()  # read back tensor by tensor when used: the GBs of deltas are not held in memory

        load = lambda: load_dense_patch(directory)  # noqa: E731
        key = self.keys.derive(label)
        shared = self.shared_patches / "patches" / label if self.shared_patches else None
        if not refresh and shared and not stage_is_fresh(directory, key) and stage_is_fresh(shared, key):
            log.info("%s patch: linked from %s (same settings)", label, shared)
            link_dir(shared, directory)
        return cached(directory, key, produce, load, self.meter, f"derive_{label}", refresh=refresh)

    def stage_seconds(self, stage: str) -> float:
        """Wall time the cached stage under ``stage`` (e.g. patches/safety, importance) took to compute
        (0 when it was never computed here)."""
        return recorded_wall_seconds(self.out / stage)

    def score(self, pairs: list[Example], patch: DensePatch, label: str) -> dict[str, Any]:
        """SNIP importance of backbone + ``patch`` on the pairs (not cached: `importance` caches both)."""
        model, tokenizer = self.backbone.model(training=True)
        names = list(patch.deltas)  # the tensors the patch was derived on
        base = self.backbone.restore_source(model, names)
        with stage_meter(self.meter, f"importance_{label}"), patched(model, patch.deltas, base):
            return snip_scores(
                model,
                tokenizer,
                pairs,
                names,
                self.config.importance,
                f"importance ({label})",
                self.progress,
                self.backbone.compute_dtype,
            )

    def importance(
        self, pairs: list[Example], safety: DensePatch, over_safety: DensePatch, directory: Path | None = None
    ):
        """Both patches' importance scores (under ``directory``, default importance/), or (None, None)
        when the merge method needs none."""
        if not MERGE_METHODS[self.config.merge.method].needs_importance:
            return None, None
        directory = Path(directory) if directory is not None else self.out / "importance"

        def load():
            return tuple(LazyTensors(directory / f"{label}.safetensors") for label in SCORE_LABELS)

        def produce():  # each label's scores go to disk before the next are computed
            harmful = own_reply_pairs(self, pairs) if self.config.importance.loss_on == "own_replies" else pairs
            for label, patch in zip(SCORE_LABELS, (safety, over_safety), strict=True):
                own_data = label == "over_safety" and self.config.importance.over_safety_data == "over_safety_train"
                data = self.over_safety_pairs(pairs) if own_data else harmful
                save_tensors(directory / f"{label}.safetensors", self.score(data, patch, label))
            return load()

        return cached(directory, self.keys.importance(), produce, load, {}, "importance")
