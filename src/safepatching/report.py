"""Human-readable and machine-readable results: tables, JSON summaries, JSONL logs, stage meters."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from safepatching.io import write_json, write_text_atomic

SUMMARY_SCHEMA_VERSION = 2  # resources/summary.schema.json


@contextlib.contextmanager
def stage_meter(record: dict[str, Any], name: str, poll_seconds: float = 0.2) -> Iterator[None]:
    """Record wall time and peak resident memory (GiB) of a stage into ``record[name]``."""
    process = psutil.Process()
    peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(poll_seconds):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        peak = max(peak, process.memory_info().rss)
        record[name] = {"wall_seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak / 2**30, 2)}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def save_eval(directory: Path, metrics: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """One evaluation's outputs: metrics.json and a JSONL record of every prompt and judgement."""
    write_jsonl(Path(directory) / "records.jsonl", records)
    write_json(Path(directory) / "metrics.json", metrics)


def summary_schema() -> dict[str, Any]:
    """The JSON Schema of summary.json (and, under $defs/metrics, of each metrics.json)."""
    text = resources.files("safepatching.resources").joinpath("summary.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


ROWS = (
    ("harmful-prompt refusal (%) ↑", "harmful_refusal_rate", 1),
    ("benign-prompt refusal (%) ↓", "benign_refusal_rate", 1),
    ("KL to backbone (nats/token) ↓", "kl_to_reference", 4),
    ("MMLU subset accuracy (%) ↑", "mmlu_accuracy", 1),
    ("GSM8K subset exact match (%) ↑", "gsm8k_exact_match", 1),
    ("reference-response perplexity ↓", "response_perplexity", 2),
    ("looping replies, all sets (%) ↓", "looping_reply_rate", 1),
)


def metric_rows(results: list[dict[str, Any]]) -> list[tuple[str, list[float | None], int]]:
    """Table rows: the fixed metrics, then one row per jailbreak family any model was evaluated on."""
    rows = [
        (title, [m.get(key) for m in results], digits)
        for title, key, digits in ROWS
        if any(m.get(key) is not None for m in results) or key == "kl_to_reference"
    ]
    benchmarks = sorted({b for m in results for b in m.get("safety_benchmarks", {})})
    for name in benchmarks:
        values = [m.get("safety_benchmarks", {}).get(name, {}).get("harmful_response_rate") for m in results]
        rows.append((f"harmful response on {name} (%) ↓", values, 1))
    for name in sorted({b for m in results for b in m.get("over_safety_benchmarks", {})}):
        for key, kind in (("refusal_rate", "refusal"), ("partial_refusal_rate", "partial refusal")):
            values = [m.get("over_safety_benchmarks", {}).get(name, {}).get(key) for m in results]
            rows.append((f"{kind} on {name} (%) ↓", values, 1))
    families = sorted({f for m in results for f in m.get("jailbreak_harmful_response_rate", {})})
    for family in families:
        values = [m.get("jailbreak_harmful_response_rate", {}).get(family) for m in results]
        rows.append((f"harmful response under {family} (%) ↓", values, 1))
    parts = list(dict.fromkeys(p for m in results for p in m.get("part_seconds", {})))
    for part in parts:
        rows.append((f"wall time: {part} (s)", [m.get("part_seconds", {}).get(part) for m in results], 1))
    if any(m.get("wall_seconds") is not None for m in results):
        rows.append(("wall time: whole evaluation (s)", [m.get("wall_seconds") for m in results], 1))
    return rows


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One column per model, one row per metric."""
    lines = ["| metric | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for title, values, digits in metric_rows(list(results.values())):
        lines.append(f"| {title} | " + " | ".join(_fmt(v, digits) for v in values) + " |")
    return "\n".join(lines) + "\n"


def before_after_markdown(before: dict[str, Any], after: dict[str, Any]) -> str:
    return comparison_markdown({"backbone": before, "patched": after})


def print_before_after(before: dict[str, Any], after: dict[str, Any], model_dir: Path, console: Console) -> None:
    table = Table(title="SafePatching: before and after")
    table.add_column("metric")
    table.add_column("backbone", justify="right")
    table.add_column("patched", justify="right")
    for title, values, digits in metric_rows([before, after]):
        table.add_row(title, *(_fmt(v, digits) for v in values))
    console.print(table)
    console.print(f"patched model written to [bold]{model_dir}[/bold]")


def print_patch_summary(summary: dict[str, Any], console: Console) -> None:
    """Totals, then changed entries and delta norm per layer and per module."""
    console.print(
        f"[bold]{summary['patch']}[/bold]: {summary['changed_entries']:,} changed entries "
        f"({100 * summary['changed_fraction_of_model']:.2f}% of the model) in {summary['tensors_changed']} tensors; "
        f"{summary['patch_bytes'] / 2**20:.1f} MiB ({100 * summary['size_fraction_of_model']:.1f}% of the model size)"
    )
    console.print(f"base fingerprint {summary['base_fingerprint'][:16]}, result {summary['result_fingerprint'][:16]}")
    for title, key in (("layer", "layers"), ("module", "modules")):
        table = Table(title=f"changes per {title}")
        for column in (title, "changed", "changed %", "delta L2"):
            table.add_column(column, justify="right" if column != title else "left")
        for row in summary[key]:
            table.add_row(
                row["name"], f"{row['changed']:,}", f"{100 * row['changed_fraction']:.2f}", f"{row['delta_l2']:.4g}"
            )
        console.print(table)
