"""Validation sweep of merge and training settings, scored on validation prompts only.

Each candidate changes one setting of the config (``--vary``: the other settings keep the config's
values, so the table shows how sensitive the result is to each) or a combination (``--grid``).
Merge settings (``merge.*``, or a bare name such as ``beta``) reuse the run's patches and
importance scores; training settings (``derive.*``, ``importance.*``) derive their own patches
under WORK_DIR/sweep/. Every candidate is merged in memory and judged on validation prompts that
are checked to be disjoint from the training pairs and from every set the config reports.

    safepatching sweep configs/bench-reference.yaml --data-dir DIR --vary beta=1,3 --vary retention=0.3,1 \\
        --benign xstest-val=bench:xstest-safe@train[150:198] --out benchmarks/results/sweep-reference

CONFIG is a bench or tune config (its pipeline and work_dir), a pipeline config (its output_dir) or a
run directory holding config.yaml. ``--set`` changes the config itself before any candidate, e.g. more
training data (``harmful_train_extra``, ``drop_eval_overlap=true``); every candidate then derives
under WORK_DIR/sweep/.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import yaml

from safepatching.config.experiments import BenchConfig, ContinualConfig, SweepConfig, TuneConfig, config_model_of
from safepatching.config.loading import build_config, parse_assignment, with_settings
from safepatching.config.settings import DatasetSpec, PipelineConfig
from safepatching.data.sources import Example, load_examples
from safepatching.errors import ConfigError
from safepatching.experiments.validation import ValidationScorer, ValidationSet, sweep_dir
from safepatching.storage.files import with_extension

TRAINING_SECTIONS = ("derive", "importance")


def read_config(path: Path, data_dir: Path) -> tuple[PipelineConfig, Path]:
    """The pipeline config and the directory holding its derived patches and scores."""
    if path.is_dir():
        config = build_config(path / "config.yaml")
        work_dir = path
    elif (kind := config_model_of(path)) in (BenchConfig, TuneConfig):
        experiment = build_config(path, model=kind)
        config, work_dir = experiment.pipeline, experiment.work_dir
    elif kind is ContinualConfig:
        raise ConfigError(
            f"{path} is a continual config: its rounds have no one set of patches to sweep.",
            "sweep a pipeline, bench or tune config",
        )
    else:
        config = build_config(path)
        work_dir = config.output_dir
    return config.model_copy(update={"data_dir": data_dir, "output_dir": work_dir}), work_dir


def parse_axes(items: list[str]) -> dict[str, list[Any]]:
    """``key=v1,v2`` items as {dotted key: values}; a bare key is a merge setting."""
    axes = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"{item!r} is not KEY=V1,V2,...", "write e.g. beta=1,2,3")
        axes[key if "." in key else f"merge.{key}"] = [yaml.safe_load(v) for v in values.split(",")]
    return axes


def candidates(vary: dict[str, list[Any]], grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One-at-a-time changes (``vary``) then every combination of ``grid``."""
    out = [{key: value} for key, values in vary.items() for value in values]
    out += [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] if grid else []
    return out


def parse_set(text: str, shuffle_seed: int) -> tuple[str, DatasetSpec]:
    """``NAME=SOURCE@SPLIT`` as a named dataset spec."""
    name, sep, rest = text.partition("=")
    source, at, split = rest.rpartition("@")
    if not sep or not at:
        raise ConfigError(f"{text!r} is not NAME=SOURCE@SPLIT.", "write e.g. oktest-val=bench:oktest@train[:24]")
    return name, DatasetSpec(source=source, split=split, shuffle_seed=shuffle_seed)


def run_sweep(request: SweepConfig, command: str = "") -> list[dict[str, Any]]:
    """Score the backbone, the config's own settings and every candidate on the validation sets;
    with ``request.out`` the table is rewritten after every candidate (a crash keeps the rows)."""
    vary = request.vary or ([] if request.grid else ["merge.beta=1,3"])
    config, work_dir = read_config(request.config, request.data_dir)
    if request.set:
        changes = dict(map(parse_assignment, request.set))
        work_dir = sweep_dir(work_dir, changes)
        config = with_settings(config, changes).model_copy(update={"output_dir": work_dir})
    planned = [(c, with_settings(config, c)) for c in [{}, *candidates(parse_axes(vary), parse_axes(request.grid))]]
    spec = config.harmful_train.model_copy(update={"split": request.harmful_split})
    sets = [ValidationSet("harmful", "harmful", load_examples(spec, request.data_dir))]
    for name, benign in map(lambda text: parse_set(text, 0), request.benign):
        sets.append(ValidationSet(name, "benign", load_examples(benign, request.data_dir)))
    validation = {s.name: s.examples for s in sets}
    scorer = ValidationScorer(config, work_dir, sets, progress=True)

    def refusal_rates() -> dict[str, float]:
        judged = scorer.judge(request.max_new_tokens)
        return {**{name: judged.rate(name) for name in validation}, "looping": judged.looping_rate()}

    rows = [{"candidate": "backbone", **refusal_rates()}]
    print(json.dumps(rows[0]), flush=True)
    for candidate, settings in planned:
        started = time.perf_counter()
        with scorer.merged(settings) as counts:
            rates = refusal_rates()
        label = ", ".join(f"{k}={v}" for k, v in candidate.items()) or "config defaults"
        row = {"candidate": label, **rates, "changed_fraction": round(counts["changed_fraction"], 4)}
        rows.append({**row, "seconds": round(time.perf_counter() - started)})
        print(json.dumps(rows[-1]), flush=True)
        if request.out:  # after every candidate, so a crash keeps the rows already paid for
            write_sweep_results(request.out, command, validation, rows, complete=len(rows) == len(planned) + 1)
    print(results_table(list(validation), rows))
    return rows


def results_table(names: list[str], rows: list[dict[str, Any]]) -> str:
    header = "| candidate | " + " | ".join(f"{n} refusal (%)" for n in names) + " | looping replies (%) |"
    columns = [*names, "looping"]
    lines = [header, "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([str(r["candidate"]), *(f"{r[n]:.1f}" for n in columns)]) + " |" for r in rows]
    return "\n".join(lines)


def write_sweep_results(out: Path, command: str, validation: dict[str, list[Example]], rows: list[dict], complete: bool):
    """OUT.json and OUT.md; an incomplete sweep says so in both."""
    sizes = {name: len(examples) for name, examples in validation.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with_extension(out, "json").write_text(
        json.dumps({"command": command, "complete": complete, "validation_sizes": sizes, "rows": rows}, indent=2)
    )
    status = "" if complete else "**Incomplete: the sweep has not finished (or stopped); rows so far.**\n\n"
    described = ", ".join(f"{name} {size}" for name, size in sizes.items())
    with_extension(out, "md").write_text(
        f"# Validation sweep\n\n`{command}`\n\n{status}Validation prompts: {described}. Refusal on harmful "
        f"prompts should rise, on benign ones fall; looping replies (a collapsed model) should stay at 0.\n\n{results_table(list(validation), rows)}\n"
    )
