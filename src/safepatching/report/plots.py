"""Plots of experiment results (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
