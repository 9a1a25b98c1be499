"""`safepatching continual`: post safety alignment round after round on new harmful data.

Each method starts from the backbone; in round r it derives its patches on round r's pairs from the
model that rounds 1..r-1 produced, merges them in (SafePatching: the controllable merge; GA and NPO:
the unlearning patch applied fully), and the result is evaluated against the original backbone.
Derived patches, importance scores and evaluations are cached per round under ``work_dir``, keyed
by everything that produced the weights they start from, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from safepatching import __version__
from safepatching.bench import header_markdown, result_header, table_columns
from safepatching.config import ContinualConfig, dump_config, fingerprint
from safepatching.data import Example, assert_disjoint, drop_overlap, load_examples
from safepatching.evaluate import EvalSets, evaluate_model, harmless_responses, load_eval_sets
from safepatching.importance import add_deltas
from safepatching.io import read_json, write_json, write_text_atomic
from safepatching.models import load_model
from safepatching.patching import merge_patches
from safepatching.pipeline import SafePatchingRun, mark_stage, stage_is_fresh
from safepatching.report import read_jsonl, save_eval

CONTINUAL_SCHEMA_VERSION = 1


def load_rounds(config: ContinualConfig, sets: EvalSets) -> list[list[Example]]:
    """Each round's pairs; refused when a round shares a prompt with another round or an eval set
    (unless pipeline.drop_eval_overlap, which drops the eval set's prompts from the round)."""
    data_dir = config.pipeline.data_dir
    rounds = [load_examples(spec, data_dir) for spec in config.rounds]
    if config.pipeline.drop_eval_overlap:
        rounds = [drop_overlap(pairs, sets.named()) for pairs in rounds]
    for index, pairs in enumerate(rounds):
        others = {f"round {j + 1}": other for j, other in enumerate(rounds) if j != index}
        assert_disjoint(pairs, {**sets.named(), **others})
    return rounds


def round_deltas(run: SafePatchingRun, method: str, pairs: list[Example]) -> dict[str, torch.Tensor]:
    """What one round adds to the model for ``method``."""
    if method == "ga":
        return dict(run.derive_one(pairs, "safety", "ascent").deltas)
    if method == "npo":
        return dict(run.derive_one(pairs, "npo", "npo").deltas)
    safety, over_safety = run.derive(pairs)
    scores = run.importance(pairs, safety, over_safety)
    deltas, _ = merge_patches(safety, over_safety, run.config.merge, run.config.seed, *scores)
    return deltas


class Continual:
    def __init__(self, config: ContinualConfig, progress: bool = True):
        self.config, self.progress = config, progress
        pipeline = config.pipeline
        self.sets = load_eval_sets(pipeline.eval, pipeline.data_dir)
        self.rounds = load_rounds(config, self.sets)
        self.backbone, self.tokenizer = load_model(
            pipeline.model, pipeline.compute_dtype, pipeline.trust_remote_code, pipeline.allow_pickle
        )
        self.work = Path(config.work_dir)

    def evaluate(self, directory: Path, model, state: str, reference_harmless: list[str] | None) -> dict[str, Any]:
        """Evaluate ``model`` (whose weights ``state`` names), or read the saved result."""
        pipeline = self.config.pipeline
        key = fingerprint(state, pipeline.eval, pipeline.data_dir, __version__)
        if stage_is_fresh(directory, key):
            return read_json(directory / "metrics.json")
        metrics, records = evaluate_model(
            model,
            self.tokenizer,
            self.sets,
            pipeline.eval,
            reference=None if reference_harmless is None else self.backbone,
            reference_harmless=reference_harmless,
            label=directory.name,
            progress=self.progress,
            data_dir=pipeline.data_dir,
        )
        save_eval(directory, metrics, records)
        mark_stage(directory, key)
        return metrics

    def run(self, command: str) -> dict[str, Any]:
        started = time.perf_counter()
        origin = fingerprint(self.config.pipeline.model, self.config.pipeline.compute_dtype)
        baseline = self.evaluate(self.work / "round-0", self.backbone, origin, None)
        reference_harmless = harmless_responses(read_jsonl(self.work / "round-0" / "records.jsonl"))
        rows: dict[str, list[dict[str, Any]]] = {}
        for method in self.config.methods:
            working = copy.deepcopy(self.backbone)
            state = origin
            rows[method] = [baseline]
            for number, (spec, pairs) in enumerate(zip(self.config.rounds, self.rounds, strict=True), start=1):
                directory = self.work / method / f"round-{number}"
                settings = self.config.pipeline.model_copy(update={"harmful_train": spec, "output_dir": directory})
                run = SafePatchingRun(settings, self.progress, loaded=(working, self.tokenizer), base_state=state)
                add_deltas(working, round_deltas(run, method, pairs))
                state = fingerprint(state, method, run.merge_key())
                rows[method].append(self.evaluate(directory / "eval", working, state, reference_harmless))
                write_results(self.config, continual_result(self.config, command, rows, started, complete=False))
            del working
        result = continual_result(self.config, command, rows, started, complete=True)
        write_results(self.config, result)
        Console().print(continual_markdown(result))
        return result


def continual_result(
    config: ContinualConfig, command: str, rows: dict[str, list[dict[str, Any]]], started: float, complete: bool
) -> dict[str, Any]:
    return {
        **result_header(config, command, time.perf_counter() - started, complete, CONTINUAL_SCHEMA_VERSION),
        "methods": {
            method: [
                {
                    "round": number,
                    "columns": table_columns(metrics, config.harmful_label, config.benign_label),
                    "harmful_response_rate_by_category": metrics.get("harmful_response_rate_by_category", {}),
                }
                for number, metrics in enumerate(per_round)
            ]
            for method, per_round in rows.items()
        },
        "config": config.model_dump(mode="json"),
    }


def _fmt(value: float | None, column: str) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if column.startswith("KL") else f"{value:.1f}"


def continual_markdown(result: dict[str, Any]) -> str:
    first = next(iter(result["methods"].values()))
    columns = list(first[0]["columns"])
    categories = sorted(
        {c for rows in result["methods"].values() for r in rows for c in r["harmful_response_rate_by_category"]}
    )
    lines = [
        *header_markdown(result, "Continual PSA"),
        "Round 0 is the backbone; round r is the model after r rounds of the method.",
        "",
        "| method | round | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for method, rows in result["methods"].items():
        for row in rows:
            cells = [_fmt(row["columns"][c], c) for c in columns]
            lines.append(f"| {method} | {row['round']} | " + " | ".join(cells) + " |")
    if categories:
        lines += ["", "Harmful-response rate (%) per category of the main harmful set:", ""]
        lines += ["| method | round | " + " | ".join(categories) + " |", "|---|---|" + "---|" * len(categories)]
        for method, rows in result["methods"].items():
            for row in rows:
                values = [_fmt(row["harmful_response_rate_by_category"].get(c), "") for c in categories]
                lines.append(f"| {method} | {row['round']} | " + " | ".join(values) + " |")
    rounds = result["config"]["rounds"]
    lines += ["", "## Rounds", ""]
    lines += [
        f"{number}. `{spec['source']}` {spec['split']} where {spec['where'] or '-'}"
        for number, spec in enumerate(rounds, 1)
    ]
    config = ContinualConfig.model_validate(result["config"])
    lines += ["", "## Config", "", "```yaml", dump_config(config).rstrip(), "```", ""]
    return "\n".join(lines)


def plot_rounds(result: dict[str, Any], path: Path) -> None:
    """One panel per goal (safety, over-safety, utility), one line per method, rounds on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(next(iter(result["methods"].values()))[0]["columns"])
    harmful = columns[0]
    benign = next(c for c in columns if c.startswith("refusal: "))
    utility = (
        "MMLU (%) ↑"
        if any(r["columns"].get("MMLU (%) ↑") is not None for rows in result["methods"].values() for r in rows)
        else "KL (nats/token) ↓"
    )
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, column, title in zip(axes, (harmful, benign, utility), ("safety", "over-safety", "utility"), strict=True):
        for method, rows in result["methods"].items():
            points = [(r["round"], r["columns"][column]) for r in rows if r["columns"].get(column) is not None]
            if column.startswith("KL") and rows[0]["columns"][column] is None:
                points.insert(0, (0, 0.0))  # the backbone's KL to itself
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
        axis.set_title(f"{title}: {column}", fontsize=9)
        axis.set_xlabel("round")
        axis.set_xticks(range(len(result["config"]["rounds"]) + 1))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"continual PSA on {result['backbone']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    figure.savefig(staging, format="png", dpi=110)
    plt.close(figure)
    staging.replace(path)


def write_results(config: ContinualConfig, result: dict[str, Any]) -> None:
    base = Path(config.output_dir)
    write_json(base / f"{config.name}.json", result)
    write_text_atomic(base / f"{config.name}.md", continual_markdown(result))
    plot_rounds(result, base / f"{config.name}.png")


def run_continual(config: ContinualConfig, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run every method's rounds and write OUTPUT_DIR/<name>.md, .json and .png."""
    return Continual(config, progress).run(command)
