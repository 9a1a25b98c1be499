"""Scoring merge candidates on validation prompts, shared by `sweep` and `tune`.

The backbone is loaded once in float32 (derivation and importance train it) plus, when the compute
dtype is lower, one copy in that dtype that generates. Each candidate is merged in memory, patched
into that copy, judged, and taken out again. The validation sets are checked to be disjoint from
the training pairs, from the over-safety prompts and from every set the config reports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safepatching.config.identity import cache_identity
from safepatching.config.settings import LEGACY_OVER_SAFETY_KEYS, PipelineConfig
from safepatching.data.overlap import assert_disjoint
from safepatching.data.sources import Example
from safepatching.evaluation.decoding import make_generator
from safepatching.evaluation.generation import HFGenerator
from safepatching.evaluation.judges.registry import Judges
from safepatching.evaluation.judges.rules import looping
from safepatching.evaluation.metrics import mean_token_kl, percent, reference_logprobs
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.directional import DirectionalEdits
from safepatching.experiments.patch_stages import PatchStages
from safepatching.experiments.training_data import TrainingData
from safepatching.method.dense import patched
from safepatching.method.directions import edit_counts
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.method.merger import PatchMerger
from safepatching.models.precision import resolved
from safepatching.storage.cache import fingerprint
from safepatching.storage.files import read_json, write_json


def sweep_dir(work_dir: Path, changes: Any) -> Path:
    """Where patches derived for ``changes`` (any JSON-able description of them) live."""
    return work_dir / "sweep" / hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:12]


def rounded_percent(flags: list[bool]) -> float:
    """The share of true flags in %, to the 0.1 point that tables and studies keep."""
    return round(percent(flags), 1)


@dataclass
class ValidationSet:
    name: str
    kind: str  # "harmful" (refusal should rise) or "benign" (refusal should fall)
    examples: list[Example]


@dataclass
class Judged:
    """Per-prompt refusal decisions of one model on every validation set, and which replies loop."""

    refusals: dict[str, list[bool]]
    looping: list[bool]

    def rate(self, name: str) -> float:
        return rounded_percent(self.refusals[name])

    def pooled(self, names: list[str]) -> list[bool]:
        return [flag for name in names for flag in self.refusals[name]]

    def looping_rate(self) -> float:
        return rounded_percent(self.looping)


class ValidationScorer:
    """Merges candidates of one config and judges them on validation sets (see the module doc)."""

    def __init__(
        self,
        config: PipelineConfig,
        work_dir: Path,
        sets: list[ValidationSet],
        harmless: list[Example] | None = None,
        kl_max_new_tokens: int = 32,
        progress: bool = False,
        judge_harmless: bool = False,
    ):
        """``harmless`` prompts, when given, measure each candidate's KL to the backbone, teacher-forced
        on the backbone's own replies (its log-probabilities are kept, not a second model); with
        ``judge_harmless`` each candidate's own replies to them are judged for refusal too."""
        self.config, self.work_dir, self.sets, self.progress = config, work_dir, sets, progress
        self.judge_harmless = judge_harmless and bool(harmless)
        named = {s.name: s.examples for s in sets}
        loading = resolved(config.loading)
        self.judges = Judges(config.eval, config.data_dir, loading=loading)
        self.judges.check_evaluation_judges()  # validation prompts are judged only: no jailbreaks, no utility
        held_out = named if config.drop_eval_overlap else None  # dropped from the pairs, else refused
        self.data = TrainingData(config, self.judges, held_out)
        self.train = self.data.harmful_pairs()
        assert_disjoint(self.train, named)
        assert_disjoint(self.data.over_safety_prompts(), named, against="over_safety.train")
        reported = self.data.eval_sets(self.train).named()
        for name, examples in reported.items():  # never tune on what is reported
            assert_disjoint(examples, named, against=f"reported {name} set")
        if harmless:
            assert_disjoint(self.train, {"harmless": harmless})
        self.backbone = Backbone(config.model, loading, config.derive.target_modules)
        held_out = {**reported, **named, **({"harmless": harmless} if harmless else {})}
        self.edits = DirectionalEdits(config, self.judges, work_dir / "directions", held_out, progress=progress)
        self.harmless, self.kl_max_new_tokens = harmless or [], kl_max_new_tokens
        self.compute_dtype = loading.compute_dtype
        self.loaded = False
        self._unpatched: dict[int, Judged] = {}

    def load(self) -> None:
        """Load the backbone and the KL reference (once; the checks above run before, so bad input
        fails fast)."""
        if self.loaded:
            return
        self.loaded = True
        self.master, self.tokenizer = self.backbone.model(training=True)  # float32: derivation updates it
        self.model, self.base = self.backbone.generating_copy(), self.backbone.generating_base()
        self.study_backbone = self.backbone.master_host()  # what every candidate derives on, restored after each
        self.kinds = {"harmful": self.judges.harmful, "benign": self.judges.refusal}
        self.generator = HFGenerator(self.model, self.tokenizer, self.config.eval.batch_size, progress=False)
        self.harmless_prompts = [e.prompt for e in self.harmless]
        self.harmless_replies, self.reference = [], []
        if self.harmless_prompts:
            self.harmless_replies = self.generator.generate(self.harmless_prompts, self.kl_max_new_tokens)
            self.reference = reference_logprobs(
                self.model, self.tokenizer, self.harmless_prompts, self.harmless_replies
            )

    def judge(self, max_new_tokens: int) -> Judged:
        """Refusal decisions of the model as it stands (patched or not) on every validation set. The
        looping share covers all of them: a collapsed model's loops read as no refusal, which a low
        benign rate alone would hide."""
        self.load()
        refusals, loops = {}, []
        for validation in self.sets:
            judge = self.kinds[validation.kind]
            self.generator.desc = validation.name
            responses = self.generator.generate([e.prompt for e in validation.examples], max_new_tokens)
            refusals[validation.name] = [
                judge(e.prompt, r).refusal for e, r in zip(validation.examples, responses, strict=True)
            ]
            loops += list(map(looping, responses))
        if self.judge_harmless:  # not pooled into either objective: a constraint's rate
            self.generator.desc = "harmless"
            responses = self.generator.generate(self.harmless_prompts, max_new_tokens)
            refusals["harmless"] = [
                self.judges.refusal(e.prompt, r).refusal for e, r in zip(self.harmless, responses, strict=True)
            ]
        return Judged(refusals, loops)

    def unpatched(self, max_new_tokens: int) -> Judged:
        """The backbone's decisions at this budget, judged once per work directory: every study that
        shares the scorer, and a new study started there, compares against the same judgements (10 min
        of generation at 1.5B). Call it outside ``merged``/``decoded``."""
        if max_new_tokens not in self._unpatched:
            c = self.config
            key = fingerprint(
                c.model,
                self.compute_dtype,
                [(s.name, s.kind, [e.prompt for e in s.examples]) for s in self.sets],
                max_new_tokens,
                c.eval.judge,
                c.eval.refusal_judge,
                c.eval.judge_model,
                c.eval.batch_size,
                *([[e.prompt for e in self.harmless]] if self.judge_harmless else []),
            )
            path = self.work_dir / "backbone-judged" / f"{key}.json"
            if path.exists():
                self._unpatched[max_new_tokens] = Judged(**read_json(path))
            else:
                self._unpatched[max_new_tokens] = self.judge(max_new_tokens)
                write_json(path, asdict(self._unpatched[max_new_tokens]))
        return self._unpatched[max_new_tokens]

    def kl(self) -> float | None:
        """KL(backbone || model as it stands) per token on the harmless prompts, if any."""
        self.load()
        if not self.harmless_prompts:
            return None
        return mean_token_kl(self.model, self.reference, self.tokenizer, self.harmless_prompts, self.harmless_replies)

    def check(self, settings: PipelineConfig) -> None:
        """A candidate's own over-safety data and direction sets must not hold a validation prompt either."""
        if settings.directional.active:
            self.edits.prompts(settings.directional.sets)
        if settings.over_safety.train != self.config.over_safety.train:
            over_safety = self.data.with_config(settings).over_safety_prompts()
            assert_disjoint(over_safety, {s.name: s.examples for s in self.sets}, against="over_safety.train")

    def derived(self, settings: PipelineConfig):
        """Patches and scores for these training settings: the config's own, or a sweep directory per
        distinct derivation (training settings and data), holding one scores directory per distinct
        importance setting (so importance variants share the patches)."""
        self.check(settings)
        self.load()
        ours, theirs = settings.over_safety.model_dump(mode="json"), self.config.over_safety.model_dump(mode="json")
        data = [(old, new) for old, new in LEGACY_OVER_SAFETY_KEYS.items() if ours[new] != theirs[new]]
        if settings.derive != self.config.derive or data:
            changes: list[Any] = [cache_identity(settings.derive)]  # a derive-only change keeps its old directory
            changes += [{old: ours[new]} for old, new in data]  # named as before, so old sweep folders match
            settings = settings.model_copy(update={"output_dir": sweep_dir(self.work_dir, changes)})
        scores_dir = None
        if settings.importance != self.config.importance:
            scores_dir = sweep_dir(Path(settings.output_dir), cache_identity(settings.importance))
        run = self.patch_stages(settings, shared_patches=Path(self.config.output_dir))
        if MERGE_METHODS[settings.merge.method].needs_importance:
            safety, over_safety = run.derive(self.train)
            return safety, over_safety, run.importance(self.train, safety, over_safety, scores_dir)
        # No SNIP pass (e.g. task arithmetic); with beta 0 the over-safety patch is multiplied by zero,
        # so the config's own stands in for one derived under these settings.
        safety = run.derive_one(self.train, "safety", settings.derive.unlearning)
        if settings.merge.beta == 0:
            run = self.patch_stages(self.config)
        return safety, run.derive_over_safety(self.train), (None, None)

    def patch_stages(self, settings: PipelineConfig, shared_patches: Path | None = None) -> PatchStages:
        """A candidate's patch stages over the study's master, data and judges (nothing loaded or read)."""
        return PatchStages.over(
            settings, self.study_backbone, self.data, self.judges, progress=self.progress, shared_patches=shared_patches
        )

    @contextmanager
    def merged(self, settings: PipelineConfig) -> Iterator[dict[str, Any]]:
        """The model patched with this candidate's merge while the block runs; yields the merge's
        counts. Its patches, scores and deltas (GBs when freshly derived) are freed on exit. A
        directional edit adds its deltas; with alpha and beta 0 no patch is derived at all."""
        self.load()
        edits = self.edits.deltas(settings, self.model, self.tokenizer, self.base)
        deltas, counts = edits, edit_counts(edits)
        if settings.merge.merges_patches:
            safety, over_safety, scores = self.derived(settings)
            merger = PatchMerger(safety, over_safety, settings.merge, settings.seed, *scores, edits=edits)
            deltas, counts = merger.merge_all()
            del safety, over_safety, scores, merger
        with patched(self.model, deltas, self.base):
            yield counts

    @contextmanager
    def decoded(self, settings: PipelineConfig) -> Iterator[dict[str, Any]]:
        """The backbone generating with this candidate's decoding rule while the block runs (nothing
        is merged); yields the counts of a merge that changed nothing."""
        self.load()
        greedy = self.generator
        self.generator = make_generator(
            self.model, self.tokenizer, settings.eval.decoding, self.config.eval.batch_size, progress=False
        )
        try:
            yield {"changed_fraction": 0.0}
        finally:
            self.generator = greedy
