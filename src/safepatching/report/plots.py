"""Plots of experiment results (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """PNG written atomically (a reader never sees half a file)."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    figure.savefig(staging, format="png", dpi=110)
    plt.close(figure)
    staging.replace(path)


def plot_tune_plane(result: dict[str, Any], path: Path) -> None:
    """Every trial on the benign-refusal vs harmful-refusal plane (short budget), the feasible front
    joined, constraint violators crossed, the backbone starred and the chosen point ringed; the
    front's full-budget re-judgements as hollow squares."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    complete = [row for row in result["trials"] if row["state"] == "complete"]
    for feasible, style in ((True, {"marker": "o", "color": "tab:blue"}), (False, {"marker": "x", "color": "tab:red"})):
        points = [(r["benign"], r["harmful"]) for r in complete if r["feasible"] == feasible]
        if points:
            label = "trial" if feasible else "trial breaking a constraint"
            axis.scatter(*zip(*points, strict=True), s=22, alpha=0.6, label=label, **style)
    front = sorted((p["screen"]["benign"], p["screen"]["harmful"]) for p in result["screened_front"])
    if front:
        axis.plot(*zip(*front, strict=True), color="tab:blue", linewidth=1.2, label="front (short budget)")
    finals = [(p["final"]["benign"]["refusal"], p["final"]["harmful"]["refusal"]) for p in result["front"]]
    if finals:
        axis.scatter(*zip(*finals, strict=True), marker="s", facecolors="none", edgecolors="tab:green", s=40,
                     label="front, full budget")  # fmt: skip
    for budget, marker in (("screen", "*"), ("final", "P")):
        base = result["backbone"][budget]
        benign = base["benign"]["refusal"] if isinstance(base["benign"], dict) else base["benign"]
        harmful = base["harmful"]["refusal"] if isinstance(base["harmful"], dict) else base["harmful"]
        axis.scatter([benign], [harmful], marker=marker, s=150, color="black", label=f"backbone ({budget} budget)")
    if result["chosen"]:
        point = next(p for p in result["front"] if p["trial"] == result["chosen"]["trial"])
        final = point["final"]
        axis.scatter([final["benign"]["refusal"]], [final["harmful"]["refusal"]], s=260, facecolors="none",
                     edgecolors="tab:orange", linewidths=2, label="chosen (full budget)")  # fmt: skip
    axis.set_xlabel("refusal on benign-but-scary prompts (%) ↓")
    axis.set_ylabel("refusal on harmful prompts (%) ↑")
    axis.set_title(f"tune: {result['model']}, {len(complete)} trials", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def plot_rounds(result: dict[str, Any], path: Path) -> None:
    """One panel per goal (safety, over-safety, utility), one line per method, rounds on the x axis;
    the safety and over-safety rates carry their 95 % Wilson intervals."""
    plt = _pyplot()
    columns = list(next(iter(result["methods"].values()))[0]["columns"])
    harmful = columns[0]
    benign = next(c for c in columns if c.startswith("refusal: "))
    utility = (
        "MMLU (%) ↑"
        if any(r["columns"].get("MMLU (%) ↑") is not None for rows in result["methods"].values() for r in rows)
        else "KL (nats/token) ↓"
    )
    evaluated_set = {harmful: "harmful", benign: "benign"}  # the records' names of the main sets
    intervals = {
        (row["set"], method, row["round"]): (row["ci_low"], row["ci_high"])
        for row in result["statistics"]
        for method in ([row["method"]] if row["round"] else result["methods"])
    }
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, column, title in zip(axes, (harmful, benign, utility), ("safety", "over-safety", "utility"), strict=True):
        for offset, (method, rows) in enumerate(result["methods"].items()):
            points = [(r["round"], r["columns"][column]) for r in rows if r["columns"].get(column) is not None]
            if column.startswith("KL") and rows[0]["columns"][column] is None:
                points.insert(0, (0, 0.0))  # the backbone's KL to itself
            if not points:
                continue
            rounds, values = zip(*points, strict=True)
            spread = offset - (len(result["methods"]) - 1) / 2  # keep the methods' intervals apart
            shifted = [number + 0.06 * spread for number in rounds]
            if column in evaluated_set:
                bounds = [intervals[evaluated_set[column], method, number] for number in rounds]
                below = [value - low for value, (low, _) in zip(values, bounds, strict=True)]
                above = [high - value for value, (_, high) in zip(values, bounds, strict=True)]
                axis.errorbar(shifted, values, yerr=[below, above], marker="o", capsize=3, label=method)
            else:
                axis.plot(shifted, values, marker="o", label=method)
        axis.set_title(f"{title}: {column}", fontsize=9)
        axis.set_xlabel("round")
        axis.set_xticks(range(len(result["config"]["rounds"]) + 1))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"continual PSA on {result['backbone']} (bars: 95 % Wilson intervals)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def plot_bench_fronts(result: dict[str, Any], path: Path) -> None:
    """Each tuned row's validation front (short budget, joined), its chosen point judged again with the
    full budget (hollow) and its test point (filled), on the benign-refusal vs harmful-refusal plane;
    the backbone as a black star (test) and plus (validation)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.2, 5.4))
    test = {
        row["model"]: row["rate"] if row["measure"] == "refusal" else 100 - row["rate"]
        for row in result["statistics"]
        if row["set"] == "harmful"
    }
    benign_test = {row["model"]: row["rate"] for row in result["statistics"] if row["set"] == "benign"}
    colours = plt.get_cmap("tab10")
    tuned = [(name, row["tuning"]) for name, row in result["methods"].items() if "tuning" in row]
    for index, (name, tuning) in enumerate(tuned):
        colour = colours(index % 10)
        front = sorted((p["benign"], p["harmful"]) for p in tuning["screened_front"])
        if front:
            axis.plot(*zip(*front, strict=True), color=colour, linewidth=1, alpha=0.6, marker=".")
        if tuning["chosen"]:
            validation = tuning["chosen"]["validation"]
            axis.scatter([validation["benign"]["refusal"]], [validation["harmful"]["refusal"]], s=70,
                         facecolors="none", edgecolors=[colour], linewidths=1.5)  # fmt: skip
        if name in test and name in benign_test:
            axis.scatter([benign_test[name]], [test[name]], s=90, color=colour, label=name, zorder=3)
    if tuned:
        base = tuned[0][1]["backbone"]
        axis.scatter([base["benign"]["refusal"]], [base["harmful"]["refusal"]], marker="P", s=120, color="black",
                     label="backbone (validation)")  # fmt: skip
    if "backbone" in test and "backbone" in benign_test:
        axis.scatter([benign_test["backbone"]], [test["backbone"]], marker="*", s=180, color="black",
                     label="backbone (test)", zorder=3)  # fmt: skip
    axis.set_xlabel("refusal on benign-but-scary prompts (%) ↓")
    axis.set_ylabel("refusal on harmful prompts (%) ↑")
    axis.set_title(
        f"bench {result['name']}: validation fronts (lines; hollow = chosen, full budget), test points (filled)",
        fontsize=8,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)
