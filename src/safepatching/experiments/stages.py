"""The stages of one run: its patch stages (derive, importance), the directions, and the merge.

A stage is skipped when its directory holds a finished stage made from the same settings (see
``storage.cache.cached`` and ``experiments.keys``); otherwise it is recomputed. The pipeline, bench,
continual PSA and the CLI's steps all go through this facade, so a stage computed by one of them is
reused by the others. It owns no weights and reads no data itself: the ``Backbone`` host holds the
model, ``TrainingData`` the pairs and sets, ``StageKeys`` the keys, and ``PatchStages`` derives
through the derivation registry (``method.derivations``). A study's candidates need only the patch
stages, and make those alone (``experiments.validation``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console

from safepatching.config.settings import PipelineConfig
from safepatching.data.sources import Example
from safepatching.evaluation.judges.registry import Judges
from safepatching.evaluation.suite import check_evaluation
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.directional import DirectionalEdits
from safepatching.experiments.keys import StageKeys
from safepatching.experiments.patch_stages import PatchStages
from safepatching.experiments.training_data import TrainingData
from safepatching.method.dense import DensePatch
from safepatching.method.directions import low_rank_delta
from safepatching.method.merger import PatchMerger
from safepatching.method.model_writer import settings_record, write_patched_model
from safepatching.models.loading import check_model_source
from safepatching.models.precision import DTYPES, resolved
from safepatching.storage.cache import cached, stage_is_fresh, stage_record

log = logging.getLogger(__name__)


class Stages:
    """The cached stages of one config, writing under ``config.output_dir``; ``meter`` collects each
    computed stage's wall time and peak memory."""

    def __init__(
        self,
        config: PipelineConfig,
        progress: bool = True,
        console: Console | None = None,
        *,
        backbone: Backbone | None = None,
        base_state: str | None = None,
        evaluates: bool = True,
    ):
        """``backbone`` is a host to share (continual PSA's working model) instead of one loading
        ``config.model``; ``base_state`` then names its weights when they are not the backbone's files
        (the rounds already applied), so cached stages of other weights are not reused. Unless the
        caller never evaluates through these stages (``evaluates``: derive, score and merge alone, a
        continual round, a bench's benign-os patch), the evaluation settings are checked here, so a bad
        judge or set fails before the derivation, not after it."""
        self.config, self.progress, self.base_state = config, progress, base_state
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Path(config.output_dir)
        self.loading = resolved(config.loading)  # a dtype this machine cannot run fast fails here
        self.meter: dict[str, Any] = {}
        self.judges = Judges(config.eval, config.data_dir, loading=self.loading)
        self.backbone = backbone or Backbone(config.model, self.loading, config.derive.target_modules, meter=self.meter)
        if evaluates:  # after the backbone's name: a bad model is named first
            check_evaluation(config.eval, self.judges)
        self.data = TrainingData(config, self.judges)
        self.keys = StageKeys(config, self.compute_dtype, self.data.harmful_pairs, base_state)
        self.patches = PatchStages(config, self.backbone, self.data, self.judges, self.keys, progress, self.meter)
        self._edits: DirectionalEdits | None = None
        if config.over_safety.train is not None and config.over_safety.replies.model:
            check_model_source(config.over_safety.replies.model)

    @property
    def compute_dtype(self) -> str:
        return self.loading.compute_dtype

    def harmful_pairs(self) -> list[Example]:
        return self.data.harmful_pairs()

    # -- merge and evaluation ------------------------------------------------------------------------
    def merge(
        self, safety: DensePatch, over_safety: DensePatch, scores, directory: Path | None = None, refresh=False
    ) -> dict[str, Any]:
        """The patched model as a HF folder (default model/), streamed from the backbone's weights;
        returns the merge counts."""
        directory = Path(directory) if directory is not None else self.out / "model"
        settings = self.config.merge

        def produce() -> dict[str, Any]:
            factors = {}
            if self.config.directional.active:
                model, tokenizer = self.backbone.model()
                factors = self.directional().factors(self.config, model, tokenizer, self.backbone.base_weight)
            edits = {name: low_rank_delta(*pair) for name, pair in factors.items()}
            merger = PatchMerger(safety, over_safety, settings, self.config.seed, *scores, edits=edits)
            counts = write_patched_model(
                self.backbone.folder(),
                directory,
                merger,
                None if settings.output_dtype == "auto" else DTYPES[settings.output_dtype],
                self.config.model,
                settings_record(self.config, safety, over_safety),
                settings.shard_size_mb,
                progress=self.progress,
                edit_factors=factors,
            )
            if counts["rounding_loss_fraction"] > 0.05:
                log.warning(
                    "%.0f%% of patched entries round away in the output dtype; set merge.output_dtype: float32",
                    100 * counts["rounding_loss_fraction"],
                )
            return counts

        def load() -> dict[str, Any]:
            return stage_record(directory / "safepatching")["counts"]

        stage_dir = directory / "safepatching"  # inside the model folder, which is written atomically
        counted = lambda counts: {"counts": counts}  # noqa: E731
        return cached(stage_dir, self.keys.merge(), produce, load, self.meter, "merge", counted, refresh)

    def directional(self, held_out: dict[str, list[Example]] | None = None) -> DirectionalEdits:
        """The directions stage under directions/ (made once; ``held_out``, the evaluation sets,
        checked against the direction sets when it is made)."""
        if self._edits is None:
            held_out = held_out if held_out is not None else self.data.eval_sets(self.harmful_pairs()).named()
            self._edits = DirectionalEdits(
                self.config, self.judges, self.out / "directions", held_out, self.base_state, self.progress
            )
        return self._edits

    def merge_is_fresh(self, directory: Path) -> bool:
        """Whether ``directory`` holds the patched model these settings make (then no patch is needed)."""
        return stage_is_fresh(Path(directory) / "safepatching", self.keys.merge())
