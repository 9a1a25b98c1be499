"""Human-readable and machine-readable results: tables, JSON summaries, JSONL logs, stage meters."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safepatching.config.experiments import BenchConfig, ContinualConfig
from safepatching.config.loading import dump_config


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


def metric_rows(results: list[dict[str, Any]], times: bool = True) -> list[tuple[str, list[float | None], int]]:
    """Table rows: the fixed metrics, then one row per jailbreak family any model was evaluated on,
    then (with ``times``) the wall time of each part of the suite."""
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
    return rows + (time_rows(results) if times else [])


def time_rows(results: list[dict[str, Any]]) -> list[tuple[str, list[float | None], int]]:
    rows = []
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


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def statistics_markdown(rows: list[dict[str, Any]], identity: tuple[str, ...] = ("model",)) -> str:
    """Each set's rate per model (the ``identity`` columns name it) with its 95 % Wilson interval and
    McNemar's exact p (paired by prompt)."""
    tests = sorted({key for row in rows for key in row if key.startswith("p_vs_")})
    lines = [
        "Rates in % with 95 % Wilson intervals; p: McNemar's exact test on the same prompts.",
        "",
        markdown_row(
            ["set", *identity, "measure", "n", "rate [95 % CI]", *(f"p vs {k[5:].replace('_', ' ')}" for k in tests)]
        ),
        markdown_row(["---"] * (4 + len(identity) + len(tests))),
    ]
    for row in rows:
        interval = f"{row['rate']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
        cells = [f"{row[k]:.3g}" if k in row else "" for k in tests]
        names = [str(row[k]) for k in identity]
        lines.append(markdown_row([row["set"], *names, row["measure"], str(row["n"]), interval, *cells]))
    return "\n".join(lines) + "\n"


def before_after_markdown(before: dict[str, Any], after: dict[str, Any]) -> str:
    return comparison_markdown({"backbone": before, "patched": after})


# Which evaluation set a rate row of the table is measured on, so that it can carry its interval.
ROW_SETS = {"harmful-prompt refusal (%) ↑": "harmful", "benign-prompt refusal (%) ↓": "benign"}
ROW_PREFIXES = (("harmful response on ", "safety/"), ("refusal on ", "over_safety/"),
                ("harmful response under ", "jailbreak/"))  # fmt: skip


def set_of_row(title: str) -> str | None:
    if title in ROW_SETS:
        return ROW_SETS[title]
    for prefix, folder in ROW_PREFIXES:
        if title.startswith(prefix) and title.endswith(" (%) ↓"):
            return folder + title[len(prefix) : -len(" (%) ↓")]
    return None


def print_before_after(
    before: dict[str, Any], after: dict[str, Any], model_dir: Path, console: Console, statistics: list[dict[str, Any]]
) -> None:
    """The table with every rate's 95 % Wilson interval and McNemar's p (``statistics``: the rows of
    ``report.statistics.compare_outcomes``); the wall times go under it."""
    by_set = {(row["set"], row["model"]): row for row in statistics}
    table = Table(title="SafePatching: before and after (95 % intervals; p: McNemar's exact test)")
    table.add_column("metric")
    table.add_column("backbone", justify="right")
    table.add_column("patched", justify="right")
    table.add_column("p", justify="right")
    for title, values, digits in metric_rows([before, after], times=False):
        name = set_of_row(title)
        rows = [by_set.get((name, label)) for label in ("backbone", "patched")]
        if name is None or None in rows:
            table.add_row(title, *(_fmt(v, digits) for v in values), "")
            continue
        flip = rows[0]["measure"] == "harmful response" and "refusal" in title  # the table counts refusals
        cells = [
            f"{_fmt(v, digits)} [{100 - r['ci_high'] if flip else r['ci_low']:.1f}, "
            f"{100 - r['ci_low'] if flip else r['ci_high']:.1f}]"
            for v, r in zip(values, rows, strict=True)
        ]
        table.add_row(title, *cells, f"{rows[1]['p_vs_backbone']:.2g}")
    console.print(table)
    prompts = {name: row["n"] for (name, label), row in by_set.items() if label == "backbone"}
    console.print("prompts per set: " + ", ".join(f"{name} {n}" for name, n in prompts.items()))
    for title, values, digits in time_rows([before, after]):
        console.print(f"{title}: backbone {_fmt(values[0], digits)}, patched {_fmt(values[1], digits)}")
    console.print(f"patched model written to [bold]{model_dir}[/bold]")


def describe_geometry(geometry: dict[str, Any]) -> str:
    """One line on how the two patches relate (see ``method.geometry``); older runs lack some figures."""
    parts = []
    if geometry.get("cosine") is not None:
        parts.append(f"cos(P_s, P_o) {geometry['cosine']:.2f}")
    if geometry.get("sign_disagreement") is not None:
        parts.append(f"signs differ on {100 * geometry['sign_disagreement']:.0f}% of the entries both change")
    regions = geometry.get("regions")
    if regions:
        parts.append(
            f"regions {100 * regions['safety_region']:.1f}% / {100 * regions['over_safety_region']:.1f}% of the "
            f"patched entries, overlap (Jaccard) {regions['overlap_jaccard']:.2f}, difference sets "
            f"{100 * regions['safety_only']:.1f}% / {100 * regions['over_safety_only']:.1f}%"
        )
    return "patch geometry: " + ("; ".join(parts) if parts else "not recorded")


def print_patch_summary(summary: dict[str, Any], console: Console) -> None:
    """Totals, then changed entries and delta norm per layer and per module."""
    console.print(
        f"[bold]{summary['patch']}[/bold]: {summary['changed_entries']:,} changed entries "
        f"({100 * summary['changed_fraction_of_model']:.2f}% of the model) in {summary['tensors_changed']} tensors; "
        f"{summary['patch_bytes'] / 2**20:.1f} MiB ({100 * summary['size_fraction_of_model']:.1f}% of the model size)"
    )
    console.print(f"base fingerprint {summary['base_fingerprint'][:16]}, result {summary['result_fingerprint'][:16]}")
    if summary.get("geometry"):
        console.print(describe_geometry(summary["geometry"]))
        by_module = summary["geometry"].get("cosine_by_module") or {}
        if by_module:
            console.print("cos(P_s, P_o) per module: " + ", ".join(f"{k} {v:.2f}" for k, v in by_module.items()))
    for title, key in (("layer", "layers"), ("module", "modules")):
        table = Table(title=f"changes per {title}")
        for column in (title, "changed", "changed %", "delta L2"):
            table.add_column(column, justify="right" if column != title else "left")
        for row in summary[key]:
            table.add_row(
                row["name"], f"{row['changed']:,}", f"{100 * row['changed_fraction']:.2f}", f"{row['delta_l2']:.4g}"
            )
        console.print(table)


def table_columns(metrics: dict[str, Any], harmful_label: str, benign_label: str) -> dict[str, float | None]:
    """The comparison's columns from one evaluation's metrics (percentages, KL in nats/token)."""
    columns: dict[str, float | None] = {f"harmful: {harmful_label} (%) ↓": metrics["harmful_response_rate"]}
    for name, result in metrics.get("safety_benchmarks", {}).items():
        columns[f"harmful: {name} (%) ↓"] = result["harmful_response_rate"]
    families = metrics.get("jailbreak_harmful_response_rate", {})
    if families:
        columns["harmful under jailbreaks (%) ↓"] = statistics.fmean(families.values())
    columns[f"refusal: {benign_label} (%) ↓"] = metrics["benign_refusal_rate"]
    for name, result in metrics.get("over_safety_benchmarks", {}).items():
        columns[f"refusal: {name} (%) ↓"] = result["refusal_rate"]
    columns["MMLU (%) ↑"] = metrics.get("mmlu_accuracy")
    columns["GSM8K (%) ↑"] = metrics.get("gsm8k_exact_match")
    columns["KL (nats/token) ↓"] = metrics.get("kl_to_reference")
    columns["refusal: harmless (%) ↓"] = metrics.get("harmless_refusal_rate")  # plain tasks a direction may refuse
    columns["looping replies (%) ↓"] = metrics.get("looping_reply_rate")  # rates above count them as compliance
    return columns


def _cell_text(summary: dict[str, Any], digits: int) -> str:
    if summary["mean"] is None:
        return "—"
    text = f"{summary['mean']:.{digits}f}"
    return text if summary["sd"] is None else f"{text} ± {summary['sd']:.{digits}f}"


def header_markdown(result: dict[str, Any], title: str) -> list[str]:
    """Title, versions, the exact command and wall time of a bench or continual result."""
    status = "" if result["complete"] else "; **incomplete**"
    return [
        f"# {title} `{result['name']}` on {result['backbone']}",
        "",
        f"safepatching {result['safepatching']}; compute dtype {result.get('compute_dtype', 'float32')}; "
        f"command: `{result['command'] or '(Python API)'}`; "
        f"wall time {result['wall_seconds'] / 60:.1f} min{status}"
        + (
            f"; compute behind the table {result['compute_seconds'] / 60:.1f} min "
            "(derivation, importance and every cell, cached ones included)"
            if "compute_seconds" in result
            else ""
        ),
        "",
    ]


def bench_markdown(result: dict[str, Any]) -> str:
    rows = result["methods"]
    columns = list(next(iter(rows.values()))["columns"]) if rows else []
    lines = [
        *header_markdown(result, "Bench"),
        "| method | seeds | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, row in rows.items():
        cells = [_cell_text(row["columns"][c], 4 if c.startswith("KL") else 2 if "×" in c else 1) for c in columns]
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells are mean ± sample sd over the seeds; methods without random retention do not depend on the",
        "seed and are evaluated once. Patches and importance are derived once (seed "
        f"{result['config']['pipeline']['seed']}) and shared by all rows (a tuned row uses the patches its study "
        "derived for its chosen training knobs). — : not measured (decoding-time",
        "methods change generation only, so KL, MMLU and GSM8K would repeat the backbone's). Inference cost",
        "is compared only for cells timed in the same run as the backbone's (— : reused from another run,",
        "whose host speed may differ by more than the methods do).",
        "",
        *dominance_markdown(result),
        *tuning_markdown(rows),
        *(
            ["## Paired statistics (first seed)", "", statistics_markdown(result["statistics"])]
            if result.get("statistics")
            else []
        ),
        "## Methods",
        "",
        *[f"- **{name}**: {row['description']}" for name, row in rows.items()],
        "",
        "## Config",
        "",
        "```yaml",
        dump_config(BenchConfig.model_validate(result["config"])).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def dominance_markdown(result: dict[str, Any]) -> list[str]:
    """SafePatching against the backbone on the test sets (harmful responses on the main harmful set,
    refusal on the main benign set: ratio, interval, McNemar's p), and which rows beat it on both."""
    stats = {(row["set"], row["model"]): row for row in result.get("statistics", [])}
    if ("harmful", "safepatching") not in stats or ("harmful", "backbone") not in stats:
        return []
    labels = result["config"]["harmful_label"], result["config"]["benign_label"]
    parts = []
    for set_name, label, what in (("harmful", labels[0], "harmful responses"), ("benign", labels[1], "refusal")):
        base, ours = stats[(set_name, "backbone")], stats[(set_name, "safepatching")]
        ratio = f"{ours['rate'] / base['rate']:.2f}×" if base["rate"] else "—"
        parts.append(
            f"{label} {what} {base['rate']:.1f} % [{base['ci_low']:.1f}, {base['ci_high']:.1f}] → {ours['rate']:.1f} % "
            f"[{ours['ci_low']:.1f}, {ours['ci_high']:.1f}] ({ratio}, p {p_value(ours.get('p_vs_backbone'))})"
        )
    kl_of = {name: row["columns"]["KL (nats/token) ↓"]["mean"] for name, row in result["methods"].items()}

    def rates(name: str) -> tuple[float, float]:
        return stats[("harmful", name)]["rate"], stats[("benign", name)]["rate"]

    ours = rates("safepatching")
    better = [
        name
        for name in result["methods"]
        if name not in ("backbone", "safepatching")
        and ("harmful", name) in stats
        and all(theirs <= mine for theirs, mine in zip(rates(name), ours, strict=True))
        and rates(name) != ours
        and (kl_of[name] is None or kl_of["safepatching"] is None or kl_of[name] <= kl_of["safepatching"])
    ]
    return [
        "## SafePatching on the test sets",
        "",
        f"Against the backbone: {'; '.join(parts)}; KL {_fmt(kl_of['safepatching'], 4)}.",
        f"Rows at least as good on both rates (at equal or lower KL, where measured): {', '.join(better) or 'none'}.",
        "",
    ]


def tuning_markdown(rows: dict[str, Any]) -> list[str]:
    """The tuned rows' studies: budget, front, chosen knobs and their validation rates (full budget)."""
    tuned = {name: row["tuning"] for name, row in rows.items() if "tuning" in row}
    if not tuned:
        return []

    def rate(value: dict[str, Any]) -> str:
        return f"{value['refusal']:.1f} [{value['ci'][0]:.1f}, {value['ci'][1]:.1f}]"

    base = next(iter(tuned.values()))["backbone"]
    lines = [
        "## Tuning (validation sets; each row's point chosen by the same rule, then evaluated above on the test sets)",
        "",
        "| method | trials | front | chosen knobs | harmful refusal ↑ | p | benign refusal ↓ | p | KL | study (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| backbone | | | | {rate(base['harmful'])} | | {rate(base['benign'])} | | | |",
    ]
    for name, tuning in tuned.items():
        chosen = tuning["chosen"]
        if chosen is None:
            lines.append(
                f"| {name} | {tuning['trials']} | {len(tuning['screened_front'])} | no feasible trial: the configured "
                f"point is evaluated | | | | | | {tuning['seconds'] / 60:.0f} |"
            )
            continue
        validation = chosen["validation"]
        lines.append(
            f"| {name} | {tuning['trials']} | {len(tuning['screened_front'])} | {knobs_text(chosen['params'])} | "
            f"{rate(validation['harmful'])} | {p_value(validation['harmful'].get('p_vs_backbone'))} | "
            f"{rate(validation['benign'])} | {p_value(validation['benign'].get('p_vs_backbone'))} | "
            f"{_fmt(validation['kl'], 4)} | {tuning['seconds'] / 60:.0f} |"
        )
    return [*lines, "", "Each study's front, trials and plot: `<results>.md/.json/.png` beside this file.", ""]


def _column_cell(value: float | None, column: str) -> str:
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
            cells = [_column_cell(row["columns"][c], c) for c in columns]
            lines.append(f"| {method} | {row['round']} | " + " | ".join(cells) + " |")
    if categories:
        lines += ["", "Harmful-response rate (%) per category of the main harmful set:", ""]
        lines += ["| method | round | " + " | ".join(categories) + " |", "|---|---|" + "---|" * len(categories)]
        for method, rows in result["methods"].items():
            for row in rows:
                values = [_column_cell(row["harmful_response_rate_by_category"].get(c), "") for c in categories]
                lines.append(f"| {method} | {row['round']} | " + " | ".join(values) + " |")
    statistics = statistics_markdown(result["statistics"], ("method", "round"))
    names = f"`harmful` is {result['config']['harmful_label']}, `benign` {result['config']['benign_label']}"
    lines += ["", "## Paired statistics", "", f"Sets as the records name them: {names}.", "", statistics.rstrip()]
    rounds = result["config"]["rounds"]
    lines += ["", "## Rounds", ""]
    lines += [
        f"{number}. `{spec['source']}` {spec['split']} where {spec['where'] or '-'}"
        for number, spec in enumerate(rounds, 1)
    ]
    config = ContinualConfig.model_validate(result["config"])
    lines += ["", "## Config", "", "```yaml", dump_config(config).rstrip(), "```", ""]
    return "\n".join(lines)


def knobs_text(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{key.removeprefix('merge.')}={value:.3g}"
        if isinstance(value, float)
        else f"{key.removeprefix('merge.')}={value}"
        for key, value in params.items()
    )


def p_value(p: float | None) -> str:
    """A p-value as tables print it: 2 significant digits, '< 0.0001' below that, '—' for none."""
    if p is None:
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}"


def separation_text(separation: dict[str, Any], backbone: dict[str, Any]) -> str:
    """One line on whether the front separates the goals (short budget, against the backbone)."""

    def rate(value: float | None) -> str:
        return "no such point" if value is None else f"{value:.1f} %"

    return (
        f"Separation (short budget; backbone {backbone['harmful']:.1f} % harmful / {backbone['benign']:.1f} % benign "
        f"refusal): lowest benign refusal without losing harmful refusal {rate(separation['benign_at_no_safety_loss'])}; "
        f"highest harmful refusal without adding benign refusal {rate(separation['harmful_at_no_benign_rise'])}; "
        f"a point better than the backbone on both: {'yes' if separation['separates'] else 'none'}."
    )


def tune_markdown(result: dict[str, Any]) -> str:
    return "\n".join(_tune_header(result) + _tune_front(result) + _tune_trials(result)) + "\n"


def _tune_header(result: dict[str, Any]) -> list[str]:
    """What was tuned, on which validation prompts, under which objectives and constraints."""
    settings = result["settings"]
    limit = settings.get("max_harmless_refusal")  # studies before it have none
    harmless_limit = "" if limit is None else f", refusal of the harmless prompts <= {limit} %"
    drop = settings.get("max_harmful_drop")
    harmless_limit += "" if drop is None else f", harmful refusal at most {drop} points below the backbone's"
    sizes = ", ".join(f"{name} {size}" for name, size in result["validation_sizes"].items())
    return [
        f"# Tuning {result['model']} ({result['compute_dtype']})",
        "",
        f"command: `{result['command']}`; wall time {result['wall_seconds'] / 60:.0f} min on this machine, all "
        "sessions of the study",
        "",
        f"Validation prompts: {sizes} (harmful: {', '.join(result['groups']['harmful'])}; benign: "
        f"{', '.join(result['groups']['benign'])}). Objectives: refusal on harmful prompts up, on benign prompts down. "
        f"Constraints: KL to the backbone <= {settings['max_kl']} nats/token, looping replies <= {settings['max_looping']} %"
        + harmless_limit
        + f". Trials judge {settings['screen_max_new_tokens']} new tokens; "
        + (
            "the front is"
            if settings.get("final_judging", "front") == "front"
            else f"the point the rule picks on the short budget (of {len(result['screened_front'])} on the front) is"
        )
        + f" judged again with {settings['final_max_new_tokens']}.",
        "",
    ]


def _tune_front(result: dict[str, Any]) -> list[str]:
    """The front judged with the full budget against the backbone, and the point chosen from it."""
    lines = [
        "## Front, judged with the full budget (refusal %, 95 % Wilson interval, McNemar p vs the backbone)",
        "",
        "| trial | knobs | harmful refusal ↑ | p | benign refusal ↓ | p | looping % | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = result["backbone"]["final"]

    def cells(final: dict[str, Any]) -> str:
        return (
            " | ".join(
                f"{rate['refusal']:.1f} [{rate['ci'][0]:.1f}, {rate['ci'][1]:.1f}] | {p_value(rate.get('p_vs_backbone'))}"
                for rate in (final["harmful"], final["benign"])
            )
            + f" | {final['looping']:.1f}"
        )

    lines.append(f"| backbone | | {cells(base)} | 0 |")
    chosen = (result["chosen"] or {}).get("trial")
    for point in result["front"]:
        mark = " **chosen**" if point["trial"] == chosen else ""
        lines.append(
            f"| {point['trial']}{mark} | {knobs_text(point['params'])} | {cells(point['final'])} | {_fmt(point['final']['kl'], 4)} |"
        )
    agree = result["agreement"]
    lines += ["", separation_text(result["separation"], result["backbone"]["screen"])]
    lines += [
        "",
        f"Short and full budgets agree on {agree['agreeing_percent']:.1f} % of {agree['decisions']} refusal decisions "
        "(the front and the backbone).",
        "",
    ]
    if result["chosen"]:
        lines.append(
            f"Chosen: trial {chosen} ({knobs_text(result['chosen']['params'])}): {result['chosen']['trade_off']:+.1f} points "
            f"of harmful refusal gained minus {result['settings']['benign_weight']} x benign refusal added, with the full "
            f"budget; written to `{result['chosen']['config']}`."
        )
        if result["chosen"].get("geometry"):
            lines += ["", f"Chosen point's {describe_geometry(result['chosen']['geometry'])}."]
    else:
        lines.append(
            "No trial met the constraints: nothing was chosen. Widen the space or relax tune.max_kl / tune.max_looping."
        )
    return lines


def _tune_trials(result: dict[str, Any]) -> list[str]:
    """Every trial's short-budget outcome (and its error when it failed)."""
    limit = result["settings"].get("max_harmless_refusal")
    lines = [
        "",
        "## Every trial (short budget)",
        "",
        "| trial | state | knobs | harmful refusal | benign refusal | looping % | KL | feasible | s |"
        + (" harmless refusal |" if limit is not None else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if limit is not None else ""),
    ]
    screen = result["backbone"]["screen"]
    lines.append(
        f"| backbone | | | {screen['harmful']:.1f} | {screen['benign']:.1f} | {screen['looping']:.1f} | 0 | | |"
    )
    for row in result["trials"]:
        if row["state"] == "complete":
            lines.append(
                f"| {row['trial']} | complete | {knobs_text(row['params'])} | {row['harmful']:.1f} | {row['benign']:.1f} | "
                f"{row['looping']:.1f} | {_fmt(row['kl'], 4)} | {'yes' if row['feasible'] else 'no'} | {row['seconds']:.0f} |"
                + (f" {_fmt(row['sets'].get('harmless'), 1)} |" if limit is not None else "")
            )
        else:
            lines.append(
                f"| {row['trial']} | {row['state']} | {knobs_text(row['params'])} | {row.get('error', '')} | | | | | |"
            )
    return lines
