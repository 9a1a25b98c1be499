"""The stages every experiment is built from: derive, score, merge, evaluate, each cached by its settings.

A stage is skipped when its directory holds a finished stage made from the same settings (see
``storage.stages.cached``); otherwise it is recomputed. The pipeline, bench, continual PSA, the
sweep and the CLI's stage commands all go through this one class, so a stage computed by one of
them is reused by the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from safepatching.config.settings import PipelineConfig
from safepatching.data.eval_sets import EvalSets, load_eval_sets
from safepatching.data.overlap import assert_disjoint, drop_overlap
from safepatching.data.sources import Example, load_examples, load_pairs
from safepatching.errors import DataError
from safepatching.evaluation.generation import HFGenerator
from safepatching.evaluation.judges.registry import Judges, judge_all
from safepatching.evaluation.judges.rules import looping
from safepatching.evaluation.suite import evaluate_model, harmless_responses
from safepatching.method.dense import (
    DensePatch,
    checkpoint_dir_for,
    holds_base,
    load_dense_patch,
    patched,
    save_dense_patch,
)
from safepatching.method.derive import Direction, derive_patch
from safepatching.method.importance import snip_scores
from safepatching.method.memory import ModelSize, check_training_fits, is_target
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.method.merger import PatchMerger, settings_record, write_patched_model
from safepatching.method.objectives import autocast
from safepatching.models.loading import check_model_source, load_model, weights_folder
from safepatching.models.precision import DTYPES, hold_output_layer_in, resolved
from safepatching.report.results import read_jsonl, save_eval, write_jsonl
from safepatching.storage.files import link_dir, read_json, save_tensors
from safepatching.storage.shards import LazyTensors, WeightFolder
from safepatching.storage.stages import cached, fingerprint, stage_is_fresh, stage_meter, stage_record

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
        loaded: tuple[Any, Any] | None = None,
        base_state: str | None = None,
        held_out: dict[str, list[Example]] | None = None,
        shared_patches: Path | None = None,
    ):
        """``loaded`` is an in-memory (model, tokenizer) to patch instead of loading ``config.model``;
        ``base_state`` then names its weights (e.g. the rounds already applied), so cached stages of
        other weights are not reused. ``held_out`` names further sets (a study's validation sets)
        whose prompts ``drop_eval_overlap`` keeps out of the training pairs, like the evaluation sets.
        ``shared_patches`` is another run's output folder: a patch it derived under the same settings
        is linked from it instead of derived again (a sweep that changes only the over-safety data
        keeps the safety patch)."""
        self.config = config
        self.progress = progress
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Path(config.output_dir)
        self.loading = resolved(config.loading)  # a dtype this machine cannot run fast fails here
        self.meter: dict[str, Any] = {}
        self._model, self._tokenizer = loaded or (None, None)
        self._given = loaded is not None
        self.base_state = base_state
        self._pairs: list[Example] | None = None
        self.held_out = held_out or {}
        self.shared_patches = shared_patches
        self.judges = Judges(config.eval, config.data_dir, loading=self.loading)
        if config.harmful_train_judge:  # an unknown judge fails here, before any work
            self.judges.check(config.harmful_train_judge)
        self._weights: WeightFolder | None = None
        self._over_safety_pairs: list[Example] | None = None
        if loaded is None:
            check_model_source(config.model)  # an unknown name fails here, before any output or work
        if config.over_safety_train is not None and config.over_safety_replies.model:
            check_model_source(config.over_safety_replies.model)

    # -- shared inputs -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> str:
        return self.loading.compute_dtype

    def backbone(self, training: bool = False):
        """The backbone in float32 for ``training`` (derivation, importance), in the compute dtype
        otherwise. One copy is held: after training it is cast in place, since the stages that
        train all come before evaluation; a model given to the constructor is used as it is."""
        dtype = DTYPES["float32" if training else self.compute_dtype]
        if self._model is not None and (self._given or next(self._model.parameters()).dtype == dtype):
            return self._model, self._tokenizer
        if self._model is not None and not training:
            self._model.to(dtype)
            return self._model, self._tokenizer
        self._model = None  # a float32 copy is loaded afresh rather than widened from rounded weights
        with stage_meter(self.meter, "load_backbone"):
            self._model, self._tokenizer = load_model(self.config.model, loading=self.loading, training=training)
            if training:
                hold_output_layer_in(self._model, DTYPES[self.compute_dtype], self.config.derive.target_modules)
        return self._model, self._tokenizer

    def backbone_folder(self) -> Path:
        """The backbone's local safetensors folder; a demo model is fetched and converted on first use."""
        if self._weights is None:
            self._weights = WeightFolder(weights_folder(self.config.model, loading=self.loading))
        return self._weights.folder

    def base_weight(self, name: str):
        """A backbone weight as stored (float32 for the demo models), read from disk on demand."""
        self.backbone_folder()
        return self._weights.read(name)

    def restore_source(self, model, names: list[str]):
        """What patching and derivation read ``model``'s untrained weights back from: the backbone's
        files for a model loaded here, and for a given one (a study's master) when it still holds
        exactly them; else None, and a copy of every touched tensor is taken (5 GB at 1.5B)."""
        return holds_base(model, names, self.base_weight) if self._given else self.base_weight

    def check_training_fits(self) -> None:
        """Refuse a derivation this machine cannot hold, from the weight files' headers and config alone."""
        folder = self.backbone_folder()
        counts = {name: info.numel for name, info in self._weights.tensors.items()}
        wanted = set(self.config.derive.target_modules)
        target = sum(n for name, n in counts.items() if is_target(name, wanted))
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        size = ModelSize.from_config(sum(counts.values()), target, config)
        machine = psutil.virtual_memory().total
        check_training_fits(self.config.model, size, self.config.derive, self.config.importance, machine)

    def harmful_pairs(self) -> list[Example]:
        """The pairs the patches are derived from: every harmful_train source, less (when asked) the
        prompts an evaluation set holds."""
        if self._pairs is None:
            pairs = load_pairs(self.config.harmful_train_specs(), self.config.data_dir)
            if self.config.drop_eval_overlap:
                evaluated = load_eval_sets(self.config.eval, self.config.data_dir).named()
                held = {
                    **{f"eval {n}": s for n, s in evaluated.items()},
                    **{f"held-out {n}": s for n, s in self.held_out.items()},
                }
                pairs = drop_overlap(pairs, held)
            if self.config.harmful_train_judge:
                pairs = self.complying(pairs)
            self._pairs = pairs
        return self._pairs

    def complying(self, pairs: list[Example]) -> list[Example]:
        """The pairs whose response ``harmful_train_judge`` finds fully compliant (a refusal or a
        hedged answer teaches ascent to unlearn the wrong thing)."""
        verdicts = judge_all(self.judges(self.config.harmful_train_judge), [e.prompt for e in pairs], [e.response or "" for e in pairs])
        kept = [e for e, v in zip(pairs, verdicts, strict=True) if not v.refusal]
        if not kept:
            raise DataError(
                f"judge {self.config.harmful_train_judge} finds none of the {len(pairs)} training responses compliant.",
                "check response_column, or set harmful_train_judge: null for curated pairs",
            )
        log.warning(
            "harmful_train_judge %s kept %d of %d training pairs (dropped %d refusing or partial responses)",
            self.config.harmful_train_judge,
            len(kept),
            len(pairs),
            len(pairs) - len(kept),
        )
        return kept

    def eval_sets(self, pairs: list[Example]) -> EvalSets:
        """The evaluation sets, refused when they share a prompt with the training pairs (the harmful
        pairs and the over-safety prompts)."""
        sets = load_eval_sets(self.config.eval, self.config.data_dir)
        assert_disjoint(pairs, sets.named())
        assert_disjoint(self.over_safety_prompts(), sets.named(), against="over_safety_train")
        return sets

    def over_safety_prompts(self) -> list[Example]:
        """The over-safety training prompts as the data gives them (replies, if any, not yet made)."""
        spec = self.config.over_safety_train
        return [] if spec is None else load_examples(spec, self.config.data_dir)

    def over_safety_pairs(self, pairs: list[Example]) -> list[Example]:
        """What the over-safety patch descends on: the harmful pairs (the paper), or over_safety_train
        with its own replies or replies generated, judged and cached under over_safety_replies/."""
        spec = self.config.over_safety_train
        if spec is None:
            return pairs
        if self._over_safety_pairs is None:
            if spec.response_column:
                self._over_safety_pairs = self.over_safety_prompts()
            else:
                self._over_safety_pairs = self.answered_over_safety_prompts(pairs)
        return self._over_safety_pairs

    def answered_over_safety_prompts(self, pairs: list[Example]) -> list[Example]:
        directory = self.out / "over_safety_replies"
        replies = self.config.over_safety_replies

        def produce() -> list[dict[str, Any]]:
            prompts = [e.prompt for e in self.over_safety_prompts()]
            if replies.model:
                model, tokenizer = load_model(replies.model, loading=self.loading)
                answers = self.answer(model, tokenizer, prompts, replies.max_new_tokens, "answer over-safety prompts")
                del model
            else:  # the backbone plus the paper's over-safety patch, which complies readily
                paper = self.derive_one(pairs, "over_safety_paper", "descent")
                model, tokenizer = self.backbone()
                scaled = {name: replies.scale * paper.deltas[name].float() for name in paper.deltas}
                with patched(model, scaled, self.restore_source(model, list(scaled))):
                    answers = self.answer(
                        model, tokenizer, prompts, replies.max_new_tokens, "answer over-safety prompts"
                    )
            verdicts = judge_all(self.judges.refusal, prompts, answers)
            rows = [
                {"prompt": p, "response": a, "refusal": v.refusal}
                for p, a, v in zip(prompts, answers, verdicts, strict=True)
            ]
            write_jsonl(directory / "replies.jsonl", rows)
            return rows

        rows = cached(
            directory,
            self.replies_key(),
            produce,
            lambda: read_jsonl(directory / "replies.jsonl"),
            self.meter,
            "over_safety_replies",
        )
        looped = [not row["refusal"] and looping(row["response"]) for row in rows]
        refused, loops = sum(row["refusal"] for row in rows), sum(looped)
        kept = [
            Example(row["prompt"], row["response"])
            for row, loop in zip(rows, looped, strict=True)
            if not row["refusal"] and not loop
        ]
        if not kept:
            raise DataError(
                f"none of the {len(rows)} generated over-safety replies complies: {refused} were refusals (judge "
                f"{self.config.eval.refusal_judge}), {loops} looped.",
                "lower over_safety_replies.scale if they loop, raise it if they refuse, name another "
                "over_safety_replies.model, or give replies in over_safety_train.response_column",
            )
        if refused or loops:
            log.warning(
                "over_safety_train: of %d generated replies, %d refusals and %d looping ones were dropped%s",
                len(rows),
                refused,
                loops,
                "; lower over_safety_replies.scale for fewer loops" if loops else "",
            )
        return kept

    def own_reply_pairs(self, pairs: list[Example]) -> list[Example]:
        """The harmful questions SNIP scores, each with the backbone's own greedy reply (generated under
        autocast from the float32 weights importance holds anyway, and cached)."""
        directory = self.out / "own_replies"
        settings = self.config.importance
        prompts = [e.prompt for e in pairs[: settings.max_examples]]

        def produce() -> list[dict[str, Any]]:
            model, tokenizer = self.backbone(training=True)
            replies = self.answer(model, tokenizer, prompts, settings.own_reply_tokens, "own replies")
            rows = [{"prompt": p, "response": r} for p, r in zip(prompts, replies, strict=True)]
            write_jsonl(directory / "replies.jsonl", rows)
            return rows

        key = fingerprint(  # the weights replying: the backbone, or it after earlier rounds (base_state)
            self.config.model, self.compute_dtype, prompts, settings.own_reply_tokens, self.base_state
        )
        rows = cached(
            directory, key, produce, lambda: read_jsonl(directory / "replies.jsonl"), self.meter, "own_replies"
        )
        return [Example(row["prompt"], row["response"]) for row in rows]

    def answer(self, model, tokenizer, prompts: list[str], max_new_tokens: int, desc: str) -> list[str]:
        """Greedy replies of ``model`` to ``prompts`` (over-safety training replies, own replies), under
        autocast: a float32 master (a study's, or one loaded for training) holds its output layer in
        the compute dtype."""
        generator = HFGenerator(model, tokenizer, self.config.eval.batch_size, self.progress, desc)
        with autocast(model, DTYPES[self.compute_dtype]):
            return generator.generate(prompts, max_new_tokens)

    # -- stage keys ----------------------------------------------------------------------------------
    def derive_key(self, label: str = "safety") -> str:
        """What a patch is derived from; the over-safety patch's data joins when it has its own."""
        c = self.config
        parts = [c.model, c.seed, self.compute_dtype, c.harmful_train, c.derive.training_settings()]
        if c.harmful_train_extra or c.drop_eval_overlap or c.harmful_train_judge:  # keyed by content: what is
            # dropped depends on the evaluation sets and the judge
            parts.append([(e.prompt, e.response) for e in self.harmful_pairs()])
        key = fingerprint(*parts, *([self.base_state] if self.base_state else []))
        if label == "over_safety" and c.over_safety_train is not None:
            key = fingerprint(key, "over_safety_train", self.replies_key())
        return key

    def replies_key(self) -> str:
        """What the over-safety training pairs depend on: the prompts and who answers them, and how."""
        c = self.config
        if c.over_safety_train.response_column:
            return fingerprint(c.over_safety_train)
        answerer = c.over_safety_replies.model or self.derive_key("over_safety_paper")
        return fingerprint(c.over_safety_train, c.over_safety_replies, answerer, c.eval.refusal_judge)

    def importance_key(self) -> str:
        c = self.config
        if c.over_safety_train is None:
            return fingerprint(self.derive_key(), c.importance.cache_settings())
        return fingerprint(self.derive_key(), self.derive_key("over_safety"), c.importance.cache_settings())

    def merge_key(self) -> str:
        return fingerprint(self.importance_key(), self.config.merge.cache_settings())

    def backbone_eval_key(self) -> str:
        c = self.config
        return fingerprint(c.model, self.compute_dtype, c.eval.cache_settings(), c.data_dir)

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
        self, pairs: list[Example], label: str, direction: Direction, directory: Path | None = None, refresh=False
    ) -> DensePatch:
        """One dense patch, saved under ``directory`` (default patches/<label>) and reused while its
        settings have not changed (unless ``refresh``)."""
        directory = Path(directory) if directory is not None else self.out / "patches" / label

        def produce() -> DensePatch:
            if self._model is None:
                self.check_training_fits()
            model, tokenizer = self.backbone(training=True)
            patch = derive_patch(
                model,
                tokenizer,
                pairs,
                direction,
                self.config.derive,
                self.config.seed,
                self.progress,
                checkpoint_dir_for(directory),
                self.compute_dtype,
                self.base_weight,  # used only where the model still holds the files' weights
            )
            save_dense_patch(patch, directory, {"label": label, "base_model": self.config.model})
            return load()  # read back tensor by tensor when used: the GBs of deltas are not held in memory

        load = lambda: load_dense_patch(directory)  # noqa: E731
        key = self.derive_key(label)
        shared = self.shared_patches / "patches" / label if self.shared_patches else None
        if not refresh and shared and not stage_is_fresh(directory, key) and stage_is_fresh(shared, key):
            log.info("%s patch: linked from %s (same settings)", label, shared)
            link_dir(shared, directory)
        return cached(directory, key, produce, load, self.meter, f"derive_{label}", refresh=refresh)

    def derive_seconds(self, label: str) -> float:
        """Wall time the cached patch of ``label`` took to derive (0 when it was never derived here)."""
        return stage_record(self.out / "patches" / label).get("wall_seconds", 0.0)

    def importance_seconds(self) -> float:
        return stage_record(self.out / "importance").get("wall_seconds", 0.0)

    def score(self, pairs: list[Example], patch: DensePatch, label: str) -> dict[str, Any]:
        """SNIP importance of backbone + ``patch`` on the pairs (not cached: `importance` caches both)."""
        model, tokenizer = self.backbone(training=True)
        names = list(patch.deltas)  # the tensors the patch was derived on
        base = self.restore_source(model, names)
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
            harmful = self.own_reply_pairs(pairs) if self.config.importance.loss_on == "own_replies" else pairs
            for label, patch in zip(SCORE_LABELS, (safety, over_safety), strict=True):
                own_data = label == "over_safety" and self.config.importance.over_safety_data == "over_safety_train"
                data = self.over_safety_pairs(pairs) if own_data else harmful
                save_tensors(directory / f"{label}.safetensors", self.score(data, patch, label))
            return load()

        return cached(directory, self.importance_key(), produce, load, {}, "importance")

    # -- merge and evaluation ------------------------------------------------------------------------
    def merge(
        self, safety: DensePatch, over_safety: DensePatch, scores, directory: Path | None = None, refresh=False
    ) -> dict[str, Any]:
        """The patched model as a HF folder (default model/), streamed from the backbone's weights;
        returns the merge counts."""
        directory = Path(directory) if directory is not None else self.out / "model"
        settings = self.config.merge

        def produce() -> dict[str, Any]:
            merger = PatchMerger(safety, over_safety, settings, self.config.seed, *scores)
            counts = write_patched_model(
                self.backbone_folder(),
                directory,
                merger,
                None if settings.output_dtype == "auto" else DTYPES[settings.output_dtype],
                self.config.model,
                settings_record(self.config, safety, over_safety),
                settings.shard_size_mb,
                progress=self.progress,
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
        return cached(stage_dir, self.merge_key(), produce, load, self.meter, "merge", counted, refresh)

    def merge_is_fresh(self, directory: Path) -> bool:
        """Whether ``directory`` holds the patched model these settings make (then no patch is needed)."""
        return stage_is_fresh(Path(directory) / "safepatching", self.merge_key())

    def evaluate(self, sets: EvalSets, model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Backbone and patched model on the same sets; KL is taken on the backbone's own replies."""
        eval_dir = self.out / "eval"
        model, tokenizer = self.backbone()
        common = {"progress": self.progress, "data_dir": self.config.data_dir, "loading": self.loading}

        def backbone_eval():
            metrics, records = evaluate_model(
                model, tokenizer, sets, self.config.eval, label="backbone", model_source=self.config.model, **common
            )
            save_eval(eval_dir / "backbone", metrics, records)
            return metrics, records

        def saved(directory: Path):
            return read_json(directory / "metrics.json"), read_jsonl(directory / "records.jsonl")

        backbone_key = self.backbone_eval_key()
        before, records = cached(
            eval_dir / "backbone", backbone_key, backbone_eval, lambda: saved(eval_dir / "backbone"), self.meter,
            "eval_backbone",
        )  # fmt: skip

        def patched_eval():
            patched_model, _ = load_model(str(model_dir), loading=self.loading)
            metrics, patched_records = evaluate_model(
                patched_model,
                tokenizer,
                sets,
                self.config.eval,
                reference=model,
                reference_harmless=harmless_responses(records),
                label="patched",
                model_source=str(model_dir),
                **common,
            )
            save_eval(eval_dir / "patched", metrics, patched_records)
            return metrics

        patched_key = fingerprint(backbone_key, self.merge_key())
        after = cached(
            eval_dir / "patched", patched_key, patched_eval, lambda: saved(eval_dir / "patched")[0], self.meter,
            "eval_patched",
        )  # fmt: skip
        return before, after
