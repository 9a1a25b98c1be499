"""Experiment settings: bench methods (and their registry), bench, continual and sweep configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_serializer, field_validator, model_validator

from safepatching.config.directional import DirectionalConfig, DirectionSets
from safepatching.config.loading import read_yaml, with_settings
from safepatching.config.settings import (
    DatasetSpec,
    DecodingConfig,
    MergeConfig,
    OverSafetyData,
    PipelineConfig,
    StrictModel,
    move_legacy_over_safety_keys,
    responses_required,
)
from safepatching.errors import ConfigError


def partial_model(full: type[StrictModel]) -> type[StrictModel]:
    """A model with every field of ``full`` optional (None: keep the base value), each value checked
    with the full field's type and constraints; overrides are thus typed and validated when read."""
    fields = {
        name: (
            (Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation) | None,
            Field(None, description=info.description),
        )
        for name, info in full.model_fields.items()
    }
    return create_model(f"{full.__name__}Overrides", __base__=StrictModel, **fields)


MergeOverrides = partial_model(MergeConfig)
DecodingOverrides = partial_model(DecodingConfig)
DirectionalOverrides = partial_model(DirectionalConfig)


def overridden(base: StrictModel, overrides: StrictModel) -> Any:
    """``base`` with the overrides that are set, validated as a whole (cross-field rules included)."""
    return type(base).model_validate({**base.model_dump(), **overrides.model_dump(exclude_none=True)})


class BenchMethod(StrictModel):
    """One row of the comparison: a merge of the derived patches, a decoding rule, or the backbone."""

    description: str = ""
    kind: Literal["backbone", "merge", "decoding"] = "merge"
    safety_patch: Literal["ascent", "npo"] = Field(
        "ascent", description="which derived patch plays P_s: gradient ascent or NPO"
    )
    over_safety_patch: Literal["descent", "benign"] = Field(
        "descent",
        exclude_if=lambda value: value == "descent",  # rows saved before it existed keep their cache keys
        description="which patch plays P_o: descent on the pipeline's over-safety data (the harmful pairs by "
        "default), or descent on the bench's over_safety.train (benign-but-scary prompts)",
    )
    merge: MergeOverrides = Field(
        default_factory=MergeOverrides, description="overrides of the pipeline's merge settings"
    )
    decoding: DecodingOverrides = Field(default_factory=DecodingOverrides, description="overrides of eval.decoding")
    directional: DirectionalOverrides = Field(
        default_factory=DirectionalOverrides,
        exclude_if=lambda value: not value.model_dump(exclude_none=True),  # rows before it keep their cache keys
        description="overrides of the pipeline's directional edits (a merge row with alpha and beta 0 edits only)",
    )

    @field_serializer("merge", "decoding", "directional")
    def _only_set(self, overrides: StrictModel) -> dict[str, Any]:
        """Only the overrides that are set: results and stage keys read as before overrides were typed."""
        return overrides.model_dump(mode="json", exclude_none=True)


_TASK_ARITHMETIC_FULL = {"method": "task_arithmetic", "retention": 1.0}
_NO_PATCH = {"method": "task_arithmetic", "alpha": 0.0, "beta": 0.0, "retention": 1.0}  # nothing derived


def edit_only(description: str, scale: str) -> BenchMethod:
    """A row that merges no patch and applies one directional edit at full ``scale``."""
    return BenchMethod(description=description, merge=dict(_NO_PATCH), directional={scale: 1.0})


BENCH_METHODS: dict[str, BenchMethod] = {
    "backbone": BenchMethod(kind="backbone", description="the untouched backbone"),
    "safepatching": BenchMethod(description="SafePatching with the pipeline's merge settings"),
    "ga": BenchMethod(
        description="unlearning: the gradient-ascent patch alone, applied fully",
        merge={**_TASK_ARITHMETIC_FULL, "alpha": 1.0, "beta": 0.0},
    ),
    "npo": BenchMethod(
        description="unlearning: the NPO patch alone, applied fully",
        safety_patch="npo",
        merge={**_TASK_ARITHMETIC_FULL, "alpha": 1.0, "beta": 0.0},
    ),
    "safety-only": BenchMethod(description="ablation: SafePatching without the over-safety term", merge={"beta": 0.0}),
    "over-safety-only": BenchMethod(description="ablation: SafePatching without the safety term", merge={"alpha": 0.0}),
    "no-retention": BenchMethod(
        description="ablation: SafePatching without random retention", merge={"retention": 1.0}
    ),
    "intersection": BenchMethod(
        description="ablation: the intersection of the regions instead of their difference sets",
        merge={"method": "safepatching_intersection"},
    ),
    "per-tensor": BenchMethod(
        description="ablation: top-a/top-b per tensor instead of one global threshold",
        merge={"mask_scope": "per_tensor"},
    ),
    "task-arithmetic": BenchMethod(
        description="merging: alpha*P_s + beta*P_o everywhere", merge=dict(_TASK_ARITHMETIC_FULL)
    ),
    "ties": BenchMethod(description="merging: TIES over the two patches", merge={"method": "ties"}),
    "dare": BenchMethod(
        description="merging: task arithmetic after random retention (DARE)", merge={"method": "task_arithmetic"}
    ),
    "safepatching-benign-os": BenchMethod(
        description="SafePatching with P_o learnt from benign-but-scary prompts (the bench's over_safety.train)",
        over_safety_patch="benign",
    ),
    "task-arithmetic-benign-os": BenchMethod(
        description="merging: alpha*P_s + beta*P_o everywhere, P_o learnt from benign-but-scary prompts",
        over_safety_patch="benign",
        merge=dict(_TASK_ARITHMETIC_FULL),
    ),
    "directional-ablate": edit_only(
        "directional: the false-refusal direction, less its refusal part, ablated from every writer", "ablate_scale"
    ),
    "directional-align": edit_only(
        "directional: LLM-VA's rewrite of the answer direction to the benign one in chosen sublayers", "align_scale"
    ),
    "directional-add": edit_only("directional (control): the refusal direction amplified in every writer", "add_scale"),
    "safepatching-directional": BenchMethod(
        description="SafePatching's two patches plus the false-refusal ablation",
        directional={"ablate_scale": 1.0},
    ),
    "self-cd": BenchMethod(kind="decoding", description="decoding: Self-CD", decoding={"method": "self-cd"}),
    "rose": BenchMethod(kind="decoding", description="decoding: ROSE", decoding={"method": "rose"}),
    "safedecoding": BenchMethod(
        kind="decoding",
        description="decoding: SafeDecoding with backbone + safety patch as the expert",
        decoding={"method": "safedecoding", "expert_model": "ga"},
    ),
}


class BenchConfig(StrictModel):
    """`safepatching bench`: every selected method on one backbone, several seeds, one table."""

    name: str = Field("bench", pattern=r"^[A-Za-z0-9._-]+$", description="results go to OUTPUT_DIR/<name>.md/.json")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    methods: list[str] = Field(
        default_factory=lambda: [
            name for name, method in BENCH_METHODS.items() if method.over_safety_patch == "descent"
        ],
        min_length=1,
        description="rows in order; the *-benign-os rows are opt-in (they derive a further patch)",
    )
    over_safety: OverSafetyData = Field(
        default_factory=lambda: OverSafetyData(
            train=DatasetSpec(source="bench:xstest-safe", split="train[100:250]", shuffle_seed=0)
        ),
        description="the *-benign-os rows' over-safety section (the other rows keep the pipeline's): what their "
        "over-safety patch descends on, and who answers it when it has no response column",
    )
    custom_methods: dict[str, BenchMethod] = Field(default_factory=dict, description="further rows, by name")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="seeds of every seeded row")
    harmful_label: str = Field("harmful", description="table name of eval.harmful")
    benign_label: str = Field("benign", description="table name of eval.benign")
    output_dir: Path = Field(Path("benchmarks/results"), description="where the results files go")
    work_dir: Path = Field(Path("runs/bench"), description="derived patches, importance and per-cell results")
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --quick")
    tuning: BenchTuning | None = Field(
        None,
        description="tune the rows it names (each with the same trials, validation sets and choice rule) and "
        "evaluate each at its chosen point; other rows keep their configured point",
    )

    def method(self, name: str) -> BenchMethod:
        return self.custom_methods.get(name) or BENCH_METHODS[name]

    def family(self, name: str) -> dict[str, Any]:
        """The row's own settings as dotted pipeline settings (what a tuned row fixes under its knobs)."""
        method = self.method(name)
        if method.kind == "decoding":
            return {
                f"eval.decoding.{k}": v for k, v in method.decoding.model_dump(mode="json", exclude_none=True).items()
            }
        fixed = {f"merge.{k}": v for k, v in method.merge.model_dump(mode="json", exclude_none=True).items()}
        if method.safety_patch == "npo":
            fixed["derive.unlearning"] = "npo"
        if method.over_safety_patch == "benign":
            fixed["over_safety"] = self.over_safety.model_dump(mode="json")
        fixed |= {f"directional.{k}": v for k, v in method.directional.model_dump(mode="json", exclude_none=True).items()}
        return fixed

    def tune_config(self, name: str) -> TuneConfig:
        """The study of one tuned row: its family fixed, its knobs searched, in the bench's shared
        tuning directory (one patch derivation for every family that trains the same way)."""
        assert self.tuning is not None
        return TuneConfig(
            name=f"{self.name}-{name}",
            pipeline=self.pipeline,
            validation=self.tuning.validation,
            tune=TuneSettings(
                **self.tuning.model_dump(exclude={"validation", "spaces"}), space=self.tuning.spaces[name]
            ),
            fixed=self.family(name),
            merges=self.method(name).kind == "merge",
            output_dir=self.output_dir / f"{self.name}-tuning",
            work_dir=self.work_dir,
            study_file=f"study-{name}.sqlite3",
        )

    def merged_method(self, method: BenchMethod) -> BenchMethod | None:
        """The method whose merge settings shape this row's model (itself, a SafeDecoding expert, or none)."""
        return method if method.kind == "merge" else self.expert_method(method)

    def expert_method(self, method: BenchMethod) -> BenchMethod | None:
        """The bench method whose merged model is a SafeDecoding row's expert (None: a folder or no expert)."""
        name = method.decoding.expert_model
        known = name in self.custom_methods or name in BENCH_METHODS
        if method.decoding.method == "safedecoding" and known and self.method(name).kind == "merge":
            return self.method(name)
        return None

    def merge_settings(self, method: BenchMethod) -> MergeConfig:
        return overridden(self.pipeline.merge, method.merge)

    def decoding_settings(self, method: BenchMethod) -> DecodingConfig:
        return overridden(self.pipeline.eval.decoding, method.decoding)

    def row_pipeline(self, method: BenchMethod) -> PipelineConfig:
        """The pipeline an untuned merge row stands for: its merge and directional overrides applied."""
        return self.pipeline.model_copy(
            update={
                "merge": self.merge_settings(method),
                "directional": overridden(self.pipeline.directional, method.directional),
            }
        )

    @model_validator(mode="before")
    @classmethod
    def _legacy_over_safety_train(cls, raw: Any) -> Any:
        """The old bench-level over_safety_train, answered (as it was) by the pipeline's replies settings."""
        if not isinstance(raw, dict) or "over_safety_train" not in raw:
            return raw
        replies = (move_legacy_over_safety_keys(raw.get("pipeline") or {}).get("over_safety") or {}).get("replies")
        raw = move_legacy_over_safety_keys(raw)  # a copy, with its own over_safety section
        if replies is not None:
            raw["over_safety"].setdefault("replies", replies)
        return raw

    @model_validator(mode="after")
    def _known_methods(self) -> BenchConfig:
        unknown = [m for m in self.methods if m not in BENCH_METHODS and m not in self.custom_methods]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {sorted(BENCH_METHODS)} or custom_methods")
        benign = [m for m in self.methods if self.method(m).over_safety_patch == "benign"]
        if benign and self.over_safety.train is None:
            raise ValueError(f"method {benign[0]!r} descends on over_safety.train; give it a source")
        for name in self.methods:  # each row's whole settings are valid before any derivation starts
            try:
                self.row_pipeline(self.method(name))
                self.decoding_settings(self.method(name))
            except ValidationError as exc:
                problem = exc.errors()[0]
                where = ".".join(str(p) for p in problem["loc"])
                message = problem["msg"].removeprefix("Value error, ")
                raise ValueError(f"method {name!r}: {where + ': ' if where else ''}{message}") from None
        for name in self.tuning.spaces if self.tuning else ():
            if name not in self.methods:
                raise ValueError(f"tuning.spaces.{name}: not a row of this bench; add it to methods or drop its space")
            if self.method(name).kind == "backbone":
                raise ValueError(f"tuning.spaces.{name}: the backbone has nothing to tune")
            try:
                self.tune_config(name)
            except ValidationError as exc:
                message = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"tuning.spaces.{name}: {message}") from None
        return self


# What a continual run's methods must share to be compared: the backbone, the rounds' data, the evaluation.
SHARED_BY_EVERY_METHOD = {"model", "harmful_train", "harmful_train_extra", "eval", "data_dir", "output_dir"}


class ContinualConfig(StrictModel):
    """`safepatching continual`: rounds of patching on disjoint harmful data, evaluated after each."""

    name: str = Field("continual", pattern=r"^[A-Za-z0-9._-]+$", description="results go to OUTPUT_DIR/<name>.*")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    rounds: Annotated[list[DatasetSpec], responses_required("every round")] = Field(
        min_length=1, description="harmful (prompt, response) pairs of each round"
    )
    methods: list[Literal["safepatching", "ga", "npo"]] = Field(
        default_factory=lambda: ["safepatching", "ga", "npo"],
        min_length=1,
        description="the methods run round by round",
    )
    settings: dict[Literal["safepatching", "ga", "npo"], dict[str, Any]] = Field(
        default_factory=dict,
        description="per method, dotted settings over `pipeline` (a tuned point, e.g. ga: {merge.alpha: 0.086, "
        "derive.max_steps: 3}); GA and NPO add their patch times merge.alpha (1 by default: applied fully)",
    )
    harmful_label: str = Field("harmful", description="table name of eval.harmful")
    benign_label: str = Field("benign", description="table name of eval.benign")
    output_dir: Path = Field(Path("benchmarks/results"), description="where the results files go")
    work_dir: Path = Field(Path("runs/continual"), description="every round's patches and evaluations")
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --quick")

    def method_pipeline(self, method: str) -> PipelineConfig:
        """The pipeline ``method`` runs each round with: the shared one and its own settings."""
        return with_settings(self.pipeline, self.settings.get(method, {}))

    @model_validator(mode="after")
    def _method_settings_apply(self) -> ContinualConfig:
        for method, settings in self.settings.items():
            if method not in self.methods:
                raise ValueError(f"settings.{method}: not a method of this run; add it to methods or drop its settings")
            shared = [key for key in settings if key.split(".")[0] in SHARED_BY_EVERY_METHOD]
            if shared:
                raise ValueError(f"settings.{method}.{shared[0]}: every method shares it; set it in pipeline")
            try:
                self.method_pipeline(method)
            except ConfigError as exc:
                raise ValueError(f"settings.{method}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _rounds_are_the_data(self) -> ContinualConfig:
        if self.pipeline.harmful_train_extra:
            raise ValueError("continual takes its harmful pairs from rounds; drop pipeline.harmful_train_extra")
        return self


class SweepConfig(StrictModel):
    """`safepatching sweep`: validation refusal rates of changed merge or training settings."""

    config: Path = Field(description="a bench config, a pipeline config or a run directory holding config.yaml")
    data_dir: Path = Field(description="the folder of benchmark and training data")
    vary: list[str] = Field(default_factory=list, description="KEY=V1,V2: one setting changed at a time")
    grid: list[str] = Field(default_factory=list, description="KEY=V1,V2: every combination")
    harmful_split: str = Field("train[48:72]", description="validation rows of the training source (after its shuffle)")
    benign: list[str] = Field(
        default_factory=lambda: ["oktest-val=bench:oktest@train[:24]"],
        description="NAME=SOURCE@SPLIT benign-but-scary validation sets (shuffle seed 0)",
    )
    set: list[str] = Field(
        default_factory=list,
        description="KEY=VALUE changes of the config itself; its patches then live under WORK_DIR/sweep/",
    )
    max_new_tokens: int = Field(32, ge=1, description="new tokens of each judged reply")
    out: Path | None = Field(None, description="write OUT.json and OUT.md")


TUNABLE_SECTIONS = ("merge.", "derive.", "importance.", "eval.decoding.", "directional.")


class SearchRange(StrictModel):
    """One knob's range: ``low``..``high`` (``log`` for a log-uniform draw, ``integer`` for whole
    numbers) or a list of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[str | int | float | bool] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _a_range_or_choices(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either low/high or choices, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (or choices)")
        if self.low >= self.high:
            raise ValueError(f"the range {self.low}..{self.high} is empty or inverted: low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    def extremes(self) -> list[Any]:
        """The values that bound the range (every choice), to validate against the config up front."""
        if self.choices is not None:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]


class ValidationSets(StrictModel):
    """The prompts a search is scored on: never a reported set (overlap is refused)."""

    harmful: dict[str, DatasetSpec] = Field(min_length=1, description="refusal should rise; pooled into one objective")
    benign: dict[str, DatasetSpec] = Field(
        min_length=1, description="benign-but-scary prompts; refusal should fall; pooled into one objective"
    )
    harmless: DatasetSpec | None = Field(
        None, description="prompts for the KL constraint (teacher-forced on the backbone's replies)"
    )


class SearchSettings(StrictModel):
    """How a study searches and chooses, whatever its knobs: shared by `tune` and the tuned bench."""

    trials: int = Field(24, ge=1, description="trials in the study (`--trials N` adds N more)")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe",
        description="Optuna's multi-objective TPE, random search, or grid: every combination of choices and "
        "integer ranges in order, each once (the study stops early when the grid is done)",
    )
    seed: int = Field(0, description="the sampler's seed")
    max_kl: float = Field(0.05, gt=0, description="constraint: KL to the backbone per token on the harmless prompts")
    max_looping: float = Field(2.0, ge=0, le=100, description="constraint: looping replies (%) on validation prompts")
    screen_max_new_tokens: int = Field(24, ge=1, description="reply budget of each trial (enough for a refusal)")
    final_max_new_tokens: int = Field(64, ge=1, description="reply budget of the front's re-evaluation")
    final_judging: Literal["front", "chosen"] = Field(
        "front",
        description="front: judge the whole feasible front again with the full budget and choose there; chosen: "
        "choose by the rule on the screened front and judge only that point again (a bench's budget)",
    )
    max_harmless_refusal: float | None = Field(
        None,
        ge=0,
        le=100,
        description="constraint: refusal (%) on the harmless validation prompts (null: not judged); a direction "
        "that refuses more also refuses plain tasks",
    )
    max_harmful_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="constraint: points of harmful refusal a candidate may lose against the backbone judged with "
        "the same budget (null: off); a guard for edits chosen to cut benign refusal",
    )
    benign_weight: float = Field(
        1.0,
        ge=0,
        description="the choice rule: among feasible front points, the most (harmful refusal gain - benign_weight x "
        "benign refusal increase) over the backbone, at the full budget",
    )


def check_knobs(space: dict[str, SearchRange], sampler: str) -> None:
    for knob, search in space.items():
        if not knob.startswith(TUNABLE_SECTIONS):
            raise ValueError(f"unknown knob {knob!r}: tune {', '.join(s + '*' for s in TUNABLE_SECTIONS)} settings")
        if sampler == "grid" and search.choices is None and not search.integer:
            raise ValueError(f"sampler grid cannot enumerate {knob}: give it choices or integer: true")


class TuneSettings(SearchSettings):
    space: dict[str, SearchRange] = Field(
        min_length=1,
        description="knob -> range; merge.* knobs reuse the cached patches and scores, derive.* knobs derive "
        "and cache patches per distinct setting, importance.* knobs score them per distinct setting, "
        "eval.decoding.* knobs change a decoding rule (with merges: false)",
    )

    @model_validator(mode="after")
    def _known_knobs(self) -> TuneSettings:
        check_knobs(self.space, self.sampler)
        return self


class TuneConfig(StrictModel):
    """`safepatching tune`: a multi-objective search of one pipeline's knobs on validation prompts."""

    name: str = Field("tune", pattern=r"^[A-Za-z0-9._-]+$", description="results go to OUTPUT_DIR/<name>.*")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    validation: ValidationSets
    tune: TuneSettings
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted settings every trial applies under its knobs (a method family, e.g. merge.method); "
        "patches are still derived relative to the pipeline, so families can share one work_dir",
    )
    merges: bool = Field(
        True, description="merge the patches into each candidate; false tunes a decoding rule on the backbone"
    )
    output_dir: Path = Field(Path("benchmarks/results"), description="where the results files go")
    work_dir: Path = Field(Path("runs/tune"), description="the study (SQLite), patches and importance")
    study_file: str = Field(
        "study.sqlite3", pattern=r"^[A-Za-z0-9._-]+$", description="the study's SQLite file in work_dir"
    )

    @model_validator(mode="after")
    def _space_fits_the_pipeline(self) -> TuneConfig:
        """Every knob names a setting and both ends of its range are valid values of it."""
        from safepatching.config.loading import with_settings
        from safepatching.errors import ConfigError

        try:
            family = with_settings(self.pipeline, self.fixed)
        except ConfigError as exc:
            raise ValueError(f"fixed: {exc.problem.removeprefix('invalid config: ').rstrip('.')}") from None
        decoding_knobs = [knob for knob in self.tune.space if knob.startswith("eval.decoding.")]
        if self.merges and decoding_knobs:
            raise ValueError(f"{decoding_knobs[0]} tunes a decoding rule: set merges: false (no patch is merged)")
        if not self.merges:
            if len(decoding_knobs) < len(self.tune.space):
                raise ValueError("with merges: false only eval.decoding.* knobs have an effect; drop the others")
            if family.eval.decoding.method in ("greedy", "safedecoding"):
                raise ValueError(
                    "merges: false tunes a contrastive decoding rule: set eval.decoding.method (in fixed) to "
                    "rose or self-cd (safedecoding's expert is a merged model, which tune does not build)"
                )
        for knob, search in self.tune.space.items():
            for value in search.extremes():
                try:
                    with_settings(self.pipeline, {**self.fixed, knob: value})
                except ConfigError as exc:
                    problem = exc.problem.removeprefix("invalid config: ").rstrip(".")
                    raise ValueError(f"tune.space.{knob}={value}: {problem}") from None
        return self


class BenchTuning(SearchSettings):
    """The tuned bench: every named row searched with these settings on these validation sets."""

    validation: ValidationSets
    spaces: dict[str, dict[str, SearchRange]] = Field(
        min_length=1,
        description="bench row -> knob -> range (merge.*, derive.*, importance.*, eval.decoding.*); a row "
        "set to null is dropped, so `--set tuning.spaces.ga=null` goes with narrowing `methods`",
    )
    final_judging: Literal["front", "chosen"] = Field(
        "chosen", description="chosen (the bench's default): only each row's chosen point is judged again"
    )

    @field_validator("spaces", mode="before")
    @classmethod
    def _drop_nulled_rows(cls, spaces: Any) -> Any:
        return {k: v for k, v in spaces.items() if v is not None} if isinstance(spaces, dict) else spaces

    @model_validator(mode="after")
    def _known_knobs(self) -> BenchTuning:
        for name, space in self.spaces.items():
            if not space:
                raise ValueError(f"spaces.{name}: give at least one knob")
            check_knobs(space, self.sampler)
        return self


BenchConfig.model_rebuild()


def config_model_of(path: Path) -> type[StrictModel]:
    """The config class a YAML file is written for, told by the top-level keys only that class has."""
    keys = set(read_yaml(path))
    kinds = ((ContinualConfig, {"rounds"}), (BenchConfig, {"seeds", "tuning"}), (TuneConfig, {"tune"}),
             (DirectionsConfig, {"harmless", "benign"}))  # fmt: skip
    for model, marks in kinds:
        if keys & marks:
            return model
    return PipelineConfig


class DirectionsConfig(DirectionSets):
    """`safepatching directions`: residual-stream directions of the backbone on three prompt sets (the
    fields of ``DirectionSets``, with the defaults the edits use), reported per layer. The prompts must
    not share one with the pipeline's evaluation sets."""

    name: str = Field("directions", pattern=r"^[A-Za-z0-9._-]+$", description="results go to OUTPUT_DIR/<name>.*")
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig, description="the backbone, its loading and the evaluation sets kept apart"
    )
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    seed: int = Field(0, description="the probes' train/held-out split")
    refusal_probe: bool = Field(
        True,
        description="also probe refused vs answered: the backbone replies to the harmful and benign prompts "
        "(refusal_max_new_tokens, judged by eval.refusal_judge) and a probe tells its refusals apart",
    )
    output_dir: Path = Field(Path("runs/directions"), description="where the report and the directions go")
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --quick")
