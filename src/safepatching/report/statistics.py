"""Intervals and paired tests for per-prompt outcomes, from ``scipy.stats``.

A rate on 50-150 prompts moves by 1-2 points per prompt, so every rate is reported with its 95 %
Wilson interval, and two models judged on the same prompts are compared with McNemar's exact test
(a two-sided binomial test on the prompts where exactly one of them refused).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from scipy.stats import binomtest

CONFIDENCE = 0.95


def wilson_interval(hits: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of hits / total, in percent."""
    if total == 0:
        return 0.0, 100.0
    interval = binomtest(hits, total).proportion_ci(confidence, method="wilson")
    return 100 * float(interval.low), 100 * float(interval.high)


def mcnemar_exact(first: list[bool], second: list[bool]) -> float:
    """Two-sided exact McNemar p-value for paired outcomes (1.0 when no prompt's outcome differs)."""
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    discordant = only_first + only_second
    return 1.0 if discordant == 0 else float(binomtest(only_first, discordant, 0.5).pvalue)


def refusals_by_set(records: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """{set: {prompt: refused}} from an evaluation's records (the prompt identifies the pair)."""
    table: dict[str, dict[str, bool]] = defaultdict(dict)
    for record in records:
        table[record["set"]][record["prompt"]] = bool(record["refusal"])
    return dict(table)


def outcome(set_name: str, refused: list[bool], harmful: bool) -> dict[str, Any]:
    """The rate that matters on one set (harmful responses on a harmful set, refusals on the others)
    with its Wilson interval."""
    hits = sum((not r) if harmful else r for r in refused)
    low, high = wilson_interval(hits, len(refused))
    return {
        "set": set_name,
        "measure": "harmful response" if harmful else "refusal",
        "n": len(refused),
        "rate": 100 * hits / len(refused) if refused else 0.0,
        "ci_low": low,
        "ci_high": high,
    }


def compare_outcomes(records: dict[str, list[dict[str, Any]]], harmful_sets: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per set and model: the rate that matters (harmful responses on the sets whose names start with
    one of ``harmful_sets``, refusals on the others) with its interval, and McNemar's p against the first model and, for the third model
    on, against the second (e.g. backbone, the paper's method, a variant)."""
    outcomes = {label: refusals_by_set(model_records) for label, model_records in records.items()}
    labels = list(outcomes)
    rows = []
    for set_name in outcomes[labels[0]]:
        prompts = list(outcomes[labels[0]][set_name])
        for index, label in enumerate(labels):
            refused = [outcomes[label][set_name][prompt] for prompt in prompts]
            row = {"model": label, **outcome(set_name, refused, set_name.startswith(harmful_sets))}
            for against in labels[: min(index, 2)]:
                baseline = [outcomes[against][set_name][prompt] for prompt in prompts]
                row[f"p_vs_{against}"] = mcnemar_exact(baseline, refused)
            rows.append(row)
    return rows


def continual_outcomes(
    records: dict[str, list[list[dict[str, Any]]]], harmful_sets: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Per set, method and round (``records[method][round]``, round 0 the backbone that every method
    shares): the rate with its interval, and McNemar's p against the backbone, against the method's
    previous round (did this round undo an earlier one?) and against the first method at the same
    round (e.g. SafePatching against GA and NPO)."""
    outcomes = {method: [refusals_by_set(r) for r in rounds] for method, rounds in records.items()}
    methods = list(outcomes)
    rows = []
    for set_name, by_prompt in outcomes[methods[0]][0].items():
        harmful = set_name.startswith(harmful_sets)
        refused = {
            (method, number): [per_round[set_name][prompt] for prompt in by_prompt]
            for method, rounds in outcomes.items()
            for number, per_round in enumerate(rounds)
        }
        rows.append({"method": "backbone", "round": 0, **outcome(set_name, refused[methods[0], 0], harmful)})
        for method, number in refused:
            if number == 0:
                continue
            row = {"method": method, "round": number, **outcome(set_name, refused[method, number], harmful)}
            row["p_vs_backbone"] = mcnemar_exact(refused[method, 0], refused[method, number])
            if number > 1:
                row["p_vs_previous_round"] = mcnemar_exact(refused[method, number - 1], refused[method, number])
            if method != methods[0] and (methods[0], number) in refused:
                row[f"p_vs_{methods[0]}"] = mcnemar_exact(refused[methods[0], number], refused[method, number])
            rows.append(row)
    return rows
