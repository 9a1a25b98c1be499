"""The stages every experiment is built from: derive, score, merge, evaluate, each cached by its settings.

A stage is skipped when its directory holds a finished stage made from the same settings (see
``storage.cache.cached`` and ``experiments.keys``); otherwise it is recomputed. The pipeline, bench,
continual PSA, the sweep and the CLI's steps all go through this one facade, so a stage computed by
one of them is reused by the others. The facade owns no weights and reads no data itself: the
``Backbone`` host holds the model, ``TrainingData`` the pairs and sets, ``StageKeys`` the keys, and
a patch comes from the derivation registry (``method.derivations``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console

from safepatching.config.settings import PipelineConfig
from safepatching.data.sources import Example
from safepatching.evaluation.judges.registry import Judges
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.directional import DirectionalEdits
from safepatching.experiments.keys import StageKeys
from safepatching.experiments.replies import over_safety_replies, own_reply_pairs
from safepatching.experiments.training_data import TrainingData
from safepatching.method.dense import DensePatch, checkpoint_dir_for, load_dense_patch, patched, save_dense_patch
from safepatching.method.derivations import DERIVATIONS, DerivationInputs
from safepatching.method.directions import low_rank_delta
from safepatching.method.importance import snip_scores
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.method.merger import PatchMerger
from safepatching.method.model_writer import settings_record, write_patched_model
from safepatching.models.loading import check_model_source
from safepatching.models.precision import DTYPES, resolved
from safepatching.storage.cache import cached, stage_is_fresh, stage_meter, stage_record
from safepatching.storage.files import link_dir, save_tensors
from safepatching.storage.shards import LazyTensors

log = logging.getLogger(__name__)
SCORE_LABELS = ("safety", "over_safety")


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
        data: TrainingData | None = None,
        base_state: str | None = None,
        shared_patches: Path | None = None,
    ):
        """``backbone`` is a host to share (a study's float32 master, continual PSA's working model)
        instead of one loading ``config.model``; ``base_state`` then names its weights when they are
        not the backbone's files (the rounds already applied), so cached stages of other weights are
        not reused. ``data`` is training data to share (a study's, with its validation sets held out).
        ``shared_patches`` is another run's output folder: a patch it derived under the same settings
        is linked from it instead of derived again (a sweep that changes only the over-safety data
        keeps the safety patch)."""
        self.config, self.progress, self.base_state, self.shared_patches = config, progress, base_state, shared_patches
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Path(config.output_dir)
        self.loading = resolved(config.loading)  # a dtype this machine cannot run fast fails here
        self.meter: dict[str, Any] = {}
        self.judges = Judges(config.eval, config.data_dir, loading=self.loading)
        self.backbone = backbone or Backbone(config.model, self.loading, config.derive.target_modules, meter=self.meter)
        self.data = data.with_config(config) if data is not None else TrainingData(config, self.judges)
        self.keys = StageKeys(config, self.compute_dtype, self.data.harmful_pairs, base_state)
        self._over_safety_pairs: list[Example] | None = None
        self._edits: DirectionalEdits | None = None
        if config.over_safety.train is not None and config.over_safety.replies.model:
            check_model_source(config.over_safety.replies.model)

    @property
    def compute_dtype(self) -> str:
        return self.loading.compute_dtype

    def harmful_pairs(self) -> list[Example]:
        return self.data.harmful_pairs()

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

    # -- derivation and importance -------------------------------------------------------------------
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
                    self.compute_dtype,
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
        return stage_record(self.out / stage).get("wall_seconds", 0.0)

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
                self.compute_dtype,
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
