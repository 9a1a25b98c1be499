"""`safepatching tune`: a multi-objective Optuna search of one pipeline's knobs on validation prompts.

Each trial merges the cached patches with the knobs it draws (derive.* knobs derive and cache their
own patches first, importance.* knobs their own scores), patches the model in memory and judges it with a short
reply budget on the validation sets: refusal on harmful prompts is maximised, refusal on
benign-but-scary prompts minimised, under two constraints (KL to the backbone on harmless
prompts, looping replies). The study lives in SQLite in the work directory: a killed run resumes
where it stopped (an interrupted trial is run again with the same knobs), and ``--trials N`` adds
N trials. The sampler is re-seeded from the number of finished trials before each draw, so an
interrupted and resumed study draws what an uninterrupted one would.

The feasible Pareto front is then judged again with the full reply budget, with Wilson intervals
and McNemar's test against the backbone; the point that the config's rule chooses is written as a
pipeline config that `safepatching run` accepts as it is.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from safepatching.config.experiments import SearchRange, TuneConfig, TuneSettings, ValidationSets
from safepatching.config.loading import with_settings
from safepatching.config.settings import PipelineConfig, legacy_over_safety_spelling
from safepatching.data.sources import load_examples
from safepatching.errors import ConfigError, TrainingError
from safepatching.experiments.validation import Judged, ValidationScorer, ValidationSet, rounded_percent
from safepatching.method.geometry import patch_geometry, region_geometry
from safepatching.models.device import device_memory
from safepatching.report.plots import plot_tune_plane
from safepatching.report.statistics import mcnemar_exact, wilson_interval
from safepatching.report.tables import tune_markdown
from safepatching.storage.files import with_extension, write_json, write_text_atomic
from safepatching.storage.lock import directory_lock

log = logging.getLogger(__name__)
STUDY_NAME = "safepatching-tune"


NOT_FINGERPRINTED = {  # where output goes, what only guards the machine, what does not change a trial
    "name": True,
    "output_dir": True,
    "work_dir": True,
    "study_file": True,
    "pipeline": {"data_dir": True, "output_dir": True, "derive": {"memory_check"}},
    "tune": {"trials", "final_max_new_tokens", "final_judging", "benign_weight"},
}
# Study settings and pipeline settings added after the first studies were made (absent from their
# fingerprints), the latter by section.
STUDY_SETTINGS_SINCE_FIRST_STUDIES = {"fixed", "merges"}
ADDED_SINCE_FIRST_STUDIES = {
    "": {"harmful_train_judge"},
    "importance": {"loss_on", "own_reply_tokens"},
    "derive": {"unlearning", "batches_per_pass"},
    "directional": {"align_iterations"},
}


def study_key(config: TuneConfig) -> str:
    """What a study's trials depend on: the pipeline, the validation sets, the space, the constraints
    and the screening budget; not the trial count, the final budget, the rule or where output goes.
    Settings at their defaults are left out, so a setting added later does not orphan a study. The
    compute dtype setting is left out too: ``auto`` resolves per machine, so a study records the dtype
    it was judged in and checks that instead (``open_study``)."""
    exclude = copy.deepcopy(NOT_FINGERPRINTED)
    exclude["pipeline"]["compute_dtype"] = True
    return _digest(config.model_dump(mode="json", exclude_defaults=True, exclude=exclude))


def first_study_key(config: TuneConfig) -> str | None:
    """The fingerprint the first studies recorded (every setting by value, as the settings then were);
    None when a setting added since is in use, which no such study can have had."""
    default = PipelineConfig()
    exclude = copy.deepcopy(NOT_FINGERPRINTED)
    if config.fixed or not config.merges:
        return None
    exclude.update(dict.fromkeys(STUDY_SETTINGS_SINCE_FIRST_STUDIES, True))
    for section, names in ADDED_SINCE_FIRST_STUDIES.items():
        ours, theirs = (
            (getattr(config.pipeline, section), getattr(default, section)) if section else (config.pipeline, default)
        )
        if any(getattr(ours, name) != getattr(theirs, name) for name in names):
            return None
        if section:
            exclude["pipeline"][section] = set(exclude["pipeline"].get(section, set())) | names
        else:
            exclude["pipeline"].update(dict.fromkeys(names, True))
    return _digest(config.model_dump(mode="json", exclude=exclude))


def _digest(relevant: dict[str, Any]) -> str:
    """The fingerprint of a study's dumped settings, the over-safety section spelt as it first was."""
    if "pipeline" in relevant:
        relevant = {**relevant, "pipeline": legacy_over_safety_spelling(relevant["pipeline"])}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def distribution(search: SearchRange) -> BaseDistribution:
    if search.choices is not None:
        return CategoricalDistribution(search.choices)
    if search.integer:
        return IntDistribution(int(search.low), int(search.high), log=search.log)
    return FloatDistribution(search.low, search.high, log=search.log)


def sampler_for(settings: TuneSettings, finished: int) -> optuna.samplers.BaseSampler:
    """A sampler seeded from the number of finished trials (see the module doc); a grid study's
    trials are queued (`queue_grid_point`), so its sampler never draws."""
    seed = settings.seed + finished
    return (
        optuna.samplers.TPESampler(seed=seed)
        if settings.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )


def grid_points(space: dict[str, SearchRange]) -> list[dict[str, Any]]:
    """Every combination of a grid study's knobs: choices as listed, integer ranges ascending."""
    values = [
        search.choices if search.choices is not None else list(range(int(search.low), int(search.high) + 1))
        for search in space.values()
    ]
    return [dict(zip(space, combination, strict=True)) for combination in itertools.product(*values)]


def queue_grid_point(study: optuna.Study, space: dict[str, SearchRange]) -> bool:
    """Queue the first grid point no trial has had (one a kill interrupted is queued already);
    False when none is left."""
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    seen = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)}
    point = next((p for p in grid_points(space) if json.dumps(p, sort_keys=True) not in seen), None)
    if point is not None:
        study.enqueue_trial(point)
    return point is not None


def open_study(config: TuneConfig, new_study: bool, compute_dtype: str) -> optuna.Study:
    """The study of this config in WORK_DIR/study.sqlite3; one made by another config is refused
    unless ``new_study`` (the old file is then kept beside the new one). So is one whose trials were
    judged in another compute dtype (``auto`` resolves per machine): its trials would not compare."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = config.work_dir / config.study_file
    storage = f"sqlite:///{path}"
    if path.exists() and new_study:
        path.rename(path.with_name(f"study-{time.strftime('%Y%m%d-%H%M%S')}.sqlite3"))
    if path.exists():
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        made_by = study.user_attrs.get("fingerprint")
        if made_by is not None and made_by == first_study_key(config):  # one of the first studies: re-keyed
            study.set_user_attr("fingerprint", study_key(config))
        elif made_by != study_key(config):
            raise ConfigError(
                f"{path} holds a study made by another config or model ({study.user_attrs.get('described', '?')}).",
                "pass --new-study to start a new one (the old file is kept beside it), or choose another work_dir",
            )
        judged_in = study.user_attrs.get("compute_dtype")  # studies made before it was recorded have none
        if judged_in is not None and judged_in != compute_dtype:
            raise ConfigError(
                f"{path} holds trials judged in {judged_in}, but compute_dtype resolves to {compute_dtype} here.",
                f"set pipeline.compute_dtype: {judged_in} where the hardware runs it fast, or pass --new-study",
            )
        return study
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("fingerprint", study_key(config))
    study.set_user_attr("compute_dtype", compute_dtype)
    study.set_user_attr("described", f"model {config.pipeline.model}, knobs {', '.join(config.tune.space)}")
    return study


def requeue_interrupted(study: optuna.Study) -> int:
    """Trials a killed run left running, or an interrupt left failed without an error of their own,
    are closed and their knobs queued again; returns how many."""
    interrupted = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and "error" not in t.user_attrs)
    ]
    queued = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(states=(TrialState.WAITING,))}
    for trial in interrupted:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        if json.dumps(trial.params, sort_keys=True) not in queued and not study.user_attrs.get(
            f"requeued:{trial.number}"
        ):
            study.enqueue_trial(trial.params)
            study.set_user_attr(f"requeued:{trial.number}", True)
    return len(interrupted)


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that ran to their end: complete, or failed with an error of their own."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)
    ]


def flags_text(flags: list[bool]) -> str:
    return "".join("1" if flag else "0" for flag in flags)


def text_flags(text: str) -> list[bool]:
    return [char == "1" for char in text]


def validation_sets(validation: ValidationSets, data_dir: Path | None) -> list[ValidationSet]:
    """The harmful and benign validation sets, read."""
    return [
        ValidationSet(name, kind, load_examples(spec, data_dir))
        for kind, specs in (("harmful", validation.harmful), ("benign", validation.benign))
        for name, spec in specs.items()
    ]


def make_scorer(config: TuneConfig, progress: bool = True) -> ValidationScorer:
    """The scorer of a study's validation sets (checked for overlap; the model loads on first use)."""
    data_dir = config.pipeline.data_dir
    sets = validation_sets(config.validation, data_dir)
    names = [s.name for s in sets]
    if len(set(names)) < len(names):
        raise ConfigError("two validation sets share a name.", "give each harmful and benign set its own name")
    for kind, group in (("harmful", config.validation.harmful), ("benign", config.validation.benign)):
        size = sum(len(s.examples) for s in sets if s.name in group)
        if size < 150:
            log.warning(
                "the %s validation prompts number %d: one prompt moves the rate by %.1f points (150 or more "
                "keep tuning from chasing noise)",
                kind,
                size,
                100 / max(size, 1),
            )
    harmless = load_examples(config.validation.harmless, data_dir) if config.validation.harmless else None
    pipeline = config.pipeline.model_copy(update={"output_dir": config.work_dir})
    return ValidationScorer(
        pipeline,
        config.work_dir,
        sets,
        harmless,
        config.pipeline.eval.kl_max_new_tokens,
        progress,
        judge_harmless=config.tune.max_harmless_refusal is not None,
    )


def candidate_settings(config: TuneConfig, pipeline: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The pipeline a trial's knobs make: the study's fixed settings, then the knobs."""
    return with_settings(pipeline, {**config.fixed, **params})


def finished_count(result: dict[str, Any]) -> int:
    """Trials a study result ran to their end (one a kill interrupted ran again as a later trial)."""
    return sum(row["state"] != "interrupted" for row in result["trials"])


class Tuner:
    """One tune run: the scorer, the study and the trials (see the module doc)."""

    def __init__(
        self,
        config: TuneConfig,
        new_study: bool = False,
        progress: bool = True,
        scorer: ValidationScorer | None = None,
    ):
        """``scorer``: one already made for the same pipeline, validation sets and work_dir (a bench
        tunes several method families with one loaded model and one set of patches)."""
        self.config, self.settings, self.progress = config, config.tune, progress
        self.scorer = scorer or make_scorer(config, progress)  # checks the sets for overlap
        self.sets = self.scorer.sets
        self.harmful_names = list(config.validation.harmful)
        self.benign_names = list(config.validation.benign)
        self.pipeline = self.scorer.config
        self.scorer.check(self.candidate({}))  # the family's own over-safety data, against the validation sets
        self.study = open_study(config, new_study, self.scorer.compute_dtype)  # refused before the model loads
        self.distributions = {knob: distribution(search) for knob, search in self.settings.space.items()}

    # -- judging ----------------------------------------------------------------------------------
    def outcome(self, judged: Judged) -> dict[str, Any]:
        """Pooled and per-set rates plus the per-prompt decisions (as 0/1 text, for paired tests)."""
        return {
            "harmful": rounded_percent(judged.pooled(self.harmful_names)),
            "benign": rounded_percent(judged.pooled(self.benign_names)),
            "sets": {name: judged.rate(name) for name in judged.refusals},
            "looping": judged.looping_rate(),
            "decisions": {name: flags_text(flags) for name, flags in judged.refusals.items()},
        }

    def backbone(self, budget: str) -> dict[str, Any]:
        """The backbone's outcome at the ``screen`` or ``final`` budget, computed once per study."""
        key = f"backbone:{budget}"
        if key not in self.study.user_attrs:
            tokens = self.settings.screen_max_new_tokens if budget == "screen" else self.settings.final_max_new_tokens
            self.study.set_user_attr(key, {**self.outcome(self.scorer.unpatched(tokens)), "kl": 0.0})
        return self.study.user_attrs[key]

    def candidate(self, params: dict[str, Any]) -> PipelineConfig:
        return candidate_settings(self.config, self.pipeline, params)

    def applied(self, candidate: PipelineConfig):
        """The model as this candidate makes it, while the block runs: merged, or decoding its way."""
        return self.scorer.merged(candidate) if self.config.merges else self.scorer.decoded(candidate)

    def score(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        with self.applied(self.candidate(trial.params)) as counts:
            outcome = self.outcome(self.scorer.judge(self.settings.screen_max_new_tokens))
            kl = self.scorer.kl() if self.config.merges else None  # a decoding rule leaves the weights alone
        outcome.update(kl=kl, changed_fraction=round(counts["changed_fraction"], 5), regions=region_geometry(counts))
        outcome["seconds"] = round(time.perf_counter() - started, 1)
        for key, value in outcome.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("kl", (kl or 0.0) - self.settings.max_kl)
        trial.set_constraint("looping", outcome["looping"] - self.settings.max_looping)
        if self.settings.max_harmless_refusal is not None:
            trial.set_constraint("harmless_refusal", outcome["sets"]["harmless"] - self.settings.max_harmless_refusal)
        if self.settings.max_harmful_drop is not None:
            drop = self.backbone("screen")["harmful"] - outcome["harmful"]
            trial.set_constraint("harmful_drop", drop - self.settings.max_harmful_drop)
        return outcome["harmful"], outcome["benign"]

    # -- the search -------------------------------------------------------------------------------
    def trade_off(self, harmful: float, benign: float, budget: str = "screen") -> float:
        """The choice rule: harmful refusal gained minus weighted benign refusal added, in points over
        the backbone judged with the same budget."""
        base = self.backbone(budget)
        return (harmful - base["harmful"]) - self.settings.benign_weight * (benign - base["benign"])

    def feasible_at_full_budget(self, final: dict[str, Any]) -> bool:
        """The constraints that generation decides, checked again on the full reply budget (``final``:
        a front point's full-budget outcome with its intervals)."""
        limit, drop = self.settings.max_harmless_refusal, self.settings.max_harmful_drop
        harmless_ok = limit is None or final["sets"].get("harmless", 0.0) <= limit
        harmful_ok = drop is None or self.backbone("final")["harmful"] - final["harmful"]["refusal"] <= drop
        return final["looping"] <= self.settings.max_looping and harmless_ok and harmful_ok

    def front(self) -> list[FrozenTrial]:
        """The feasible Pareto front of the screened trials, by trial number."""
        return sorted(self.study.best_trials, key=lambda t: t.number)

    def search(self, target: int) -> None:
        """Run trials until ``target`` have finished."""
        self.backbone("screen")
        done = len(finished(self.study))
        bar = tqdm(total=target, initial=min(done, target), desc="tune", unit="trial", disable=not self.progress)
        while done < target:
            if self.settings.sampler == "grid" and not queue_grid_point(self.study, self.settings.space):
                log.info("every grid point is tried: the study stops at %d trials", done)
                break
            self.study.sampler = sampler_for(self.settings, done)
            trial = self.study.ask(self.distributions)
            try:
                values = self.score(trial)
            except TrainingError as exc:  # this trial's knobs cannot be derived; the study goes on
                trial.set_user_attr("error", exc.problem)
                self.study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, exc.problem)
            else:
                self.study.tell(trial, list(values))
            done += 1
            front = self.front()
            best = max((self.trade_off(*t.values) for t in front), default=None)
            bar.set_postfix_str(
                f"front {len(front)}, best trade-off {best:+.1f} points"
                if best is not None
                else "no feasible trial yet"
            )
            bar.update(1)
        bar.close()

    def geometry(self, trial: FrozenTrial) -> dict[str, Any] | None:
        """How the trial's two patches relate (cosine, sign disagreement) and its merge regions' overlap;
        None for a decoding rule or a merge that leaves the over-safety patch out (beta 0)."""
        candidate = self.candidate(trial.params)
        if not self.config.merges or candidate.merge.beta == 0:
            return None
        safety, over_safety, _ = self.scorer.derived(candidate)
        return {**patch_geometry(safety.deltas, over_safety.deltas), "regions": trial.user_attrs.get("regions")}

    def final(self, trial: FrozenTrial) -> dict[str, Any]:
        """A front trial judged again with the full reply budget (once per study)."""
        key = f"final:{trial.number}"
        if key not in self.study.user_attrs:
            with self.applied(self.candidate(trial.params)):
                outcome = self.outcome(self.scorer.judge(self.settings.final_max_new_tokens))
            self.study.set_user_attr(key, {**outcome, "kl": trial.user_attrs["kl"]})
        return self.study.user_attrs[key]


def with_intervals(
    outcome: dict[str, Any], groups: dict[str, list[str]], backbone: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pooled rates with 95 % Wilson intervals and (given the backbone's outcome) McNemar's p against
    the backbone on the same prompts, to three significant digits."""
    out = {}
    for group, names in groups.items():
        flags = [flag for name in names for flag in text_flags(outcome["decisions"][name])]
        low, high = wilson_interval(sum(flags), len(flags))
        out[group] = {"refusal": rounded_percent(flags), "ci": [round(low, 1), round(high, 1)], "n": len(flags)}
        if backbone is not None:
            base = [flag for name in names for flag in text_flags(backbone["decisions"][name])]
            out[group]["p_vs_backbone"] = float(f"{mcnemar_exact(base, flags):.3g}")
    return out


def agreement(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """How often the short-budget decision equals the full-budget one, over every re-judged prompt."""
    same = total = 0
    for screen, final in pairs:
        for name, text in screen["decisions"].items():
            same += sum(a == b for a, b in zip(text, final["decisions"][name], strict=True))
            total += len(text)
    return {"decisions": total, "agreeing_percent": round(100 * same / max(total, 1), 1)}


def separation(front: list[dict[str, Any]], backbone: dict[str, Any]) -> dict[str, Any]:
    """What a front says about separating the goals, on the short budget every trial was judged with:
    the lowest benign refusal among points refusing at least as many harmful prompts as the backbone,
    the highest harmful refusal among points refusing no more benign prompts than it (None where no
    point qualifies), and whether any point beats the backbone on both."""
    points = [(p["screen"]["harmful"], p["screen"]["benign"]) for p in front]
    harmful, benign = backbone["harmful"], backbone["benign"]
    return {
        "benign_at_no_safety_loss": min((b for h, b in points if h >= harmful), default=None),
        "harmful_at_no_benign_rise": max((h for h, b in points if b <= benign), default=None),
        "separates": any(h > harmful and b < benign for h, b in points),
    }


def screen_outcome(trial: FrozenTrial) -> dict[str, Any]:
    return {key: trial.user_attrs[key] for key in ("harmful", "benign", "sets", "looping", "decisions", "kl")}


def run_tune(
    config: TuneConfig,
    command: str = "",
    trials: int | None = None,
    new_study: bool = False,
    progress: bool = True,
    scorer: ValidationScorer | None = None,
) -> dict[str, Any]:
    """Search, re-judge the front (or only the point the rule picks, with ``final_judging: chosen``),
    choose a point; write OUTPUT_DIR/NAME.{md,json,png} and NAME.chosen.yaml."""
    started = time.perf_counter()
    with directory_lock(config.work_dir, command):  # before the study is opened
        tuner = Tuner(config, new_study, progress, scorer)
        study, settings = tuner.study, config.tune
        if requeued := requeue_interrupted(study):
            log.info("resuming: %d interrupted trial(s) run again with the same knobs", requeued)
        done = len(finished(study))
        target = done + trials if trials is not None else max(settings.trials, done)
        tuner.search(target)

        groups = {"harmful": tuner.harmful_names, "benign": tuner.benign_names}
        backbone_final = tuner.backbone("final")
        screened_front = tuner.front()
        front = judged_front(tuner, screened_front, groups, backbone_final)
        seconds = study.user_attrs.get("seconds", 0.0) + time.perf_counter() - started
        study.set_user_attr("seconds", round(seconds, 1))
        result = {
            "command": command,
            "name": config.name,
            "model": config.pipeline.model,
            "compute_dtype": tuner.scorer.compute_dtype,
            "device": device_memory().record(),
            "fingerprint": study_key(config),
            "settings": settings.model_dump(mode="json"),
            "validation_sizes": {s.name: len(s.examples) for s in tuner.sets},
            "groups": groups,
            "wall_seconds": round(seconds, 1),
            "backbone": {
                "screen": tuner.backbone("screen"),
                "final": {**backbone_final, **with_intervals(backbone_final, groups)},
            },
            "trials": [trial_row(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING],
            "screened_front": [
                {"trial": t.number, "params": t.params, "screen": screen_outcome(t)} for t in screened_front
            ],
            "front": front,
            "separation": separation([{"screen": screen_outcome(t)} for t in screened_front], tuner.backbone("screen")),
            "agreement": agreement(
                [(p["screen"], p["final"]) for p in front] + [(tuner.backbone("screen"), backbone_final)]
            ),
        }
        result["chosen"] = chosen_point(tuner, front, command)
        write_tune_results(config, result)
        return result


def judged_front(
    tuner: Tuner, screened_front: list[FrozenTrial], groups: dict[str, list[str]], backbone_final: dict
) -> list[dict[str, Any]]:
    """The screened front's points re-judged on the full budget, with intervals and tests against the
    backbone; with ``final_judging: chosen`` only the point the rule picks on the short budget."""
    judged = screened_front
    if tuner.config.tune.final_judging == "chosen":
        judged = sorted(screened_front, key=lambda t: tuner.trade_off(*t.values), reverse=True)[:1]
    front = []
    for trial in sorted(judged, key=lambda t: t.number):
        final = tuner.final(trial)
        front.append(
            {
                "trial": trial.number,
                "params": trial.params,
                "screen": screen_outcome(trial),
                "final": {**final, **with_intervals(final, groups, backbone_final)},
            }
        )
    return front


def chosen_point(tuner: Tuner, front: list[dict[str, Any]], command: str) -> dict[str, Any] | None:
    """The rule's pick among the front's points that are feasible at the full budget, its config
    written beside the results; None when no point is feasible."""

    def final_trade_off(point: dict[str, Any]) -> float:
        return tuner.trade_off(point["final"]["harmful"]["refusal"], point["final"]["benign"]["refusal"], "final")

    feasible = [p for p in front if tuner.feasible_at_full_budget(p["final"])]
    chosen = max(feasible, key=final_trade_off, default=None)
    if chosen is None:
        return None
    return {
        "trial": chosen["trial"],
        "params": chosen["params"],
        "trade_off": round(final_trade_off(chosen), 1),
        "config": str(write_chosen_config(tuner.config, tuner.candidate(chosen["params"]), chosen["trial"], command)),
        "geometry": tuner.geometry(tuner.study.trials[chosen["trial"]]),
    }


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    state = trial.state.name.lower()
    if trial.state in (TrialState.FAIL, TrialState.RUNNING) and "error" not in trial.user_attrs:
        state = "interrupted"  # its knobs were queued again and ran as a later trial
    row = {"trial": trial.number, "state": state, "params": trial.params}
    if trial.state == TrialState.COMPLETE:
        row |= {
            key: attrs[key] for key in ("harmful", "benign", "sets", "looping", "kl", "changed_fraction", "seconds")
        }
        row["feasible"] = all(value <= 0 for value in trial.constraints.values())
    elif "error" in attrs:
        row["error"] = attrs["error"]
    return row


def write_chosen_config(config: TuneConfig, chosen: PipelineConfig, number: int, command: str) -> Path:
    """The chosen point as a pipeline config for `safepatching run` (the data directory stays a flag)."""
    path = config.output_dir / f"{config.name}.chosen.yaml"
    settings = chosen.model_copy(update={"output_dir": Path("runs") / f"{config.name}-chosen"})
    body = yaml.safe_dump(settings.model_dump(mode="json", exclude={"data_dir"}), sort_keys=False)
    header = f"# Trial {number} of `{command or 'safepatching tune'}`, chosen by its rule; run it with\n"
    header += f"#   safepatching run {path} --data-dir DIR\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, header + body)
    return path


def write_tune_results(config: TuneConfig, result: dict[str, Any]) -> None:
    out = config.output_dir / config.name
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(with_extension(out, "json"), result)
    write_text_atomic(with_extension(out, "md"), tune_markdown(result))
    plot_tune_plane(result, with_extension(out, "png"))
