"""One table of tuning variants: how each moves the validation front and the patch geometry.

    python benchmarks/variants.py benchmarks/results/tune-reference.json benchmarks/results/tune-1.5b.json \
        --paired-with benchmarks/results/tune-reference.json benchmarks/results/tune-1.5b.json \
        --out benchmarks/results/variants

Each input is the JSON of a `safepatching tune` study (a backbone, a training-data, importance or
over-safety-data variant). One row per study: backbone, trials, front size, the backbone's validation
refusal rates, the front's separation figures (short budget: lowest benign refusal without losing
harmful refusal, highest harmful refusal without adding benign refusal, a point better on both), the
chosen point's rates with 95 % Wilson intervals (full budget), its KL, cos(P_s, P_o), sign
disagreement and region overlap (Jaccard). Writes OUT.md and OUT.json; last line ``separates: N of M``.

``--paired-with REFERENCE.json...`` adds a paired comparison: studies seeded alike draw the same knobs
for their first (random) trials, so a variant's trials can be matched to the reference study's trials at
identical knobs. Each study is paired with the reference of its own backbone and compute dtype (one
reference per backbone: tune-reference for 0.5B, tune-1.5b for 1.5B); a study with none is listed
unpaired. For each study, over its matched trials: the mean change in harmful and benign refusal, and in
their difference (harmful minus benign, the separation), each with a 95 % t interval
(``scipy.stats.ttest_rel``). A few trials per variant then measure its effect at the same merges.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from scipy import stats

from safepatching.experiments.tune import finished_count
from safepatching.report.tables import knobs_text
from safepatching.storage.files import with_extension, write_json, write_text_atomic


def variant_row(result: dict[str, Any]) -> dict[str, Any]:
    chosen, geometry = result.get("chosen") or {}, (result.get("chosen") or {}).get("geometry") or {}
    final = next((p["final"] for p in result["front"] if p["trial"] == chosen.get("trial")), None)
    return {
        "study": result["name"],
        "model": result["model"],
        "compute_dtype": result.get("compute_dtype"),
        "trials": finished_count(result),
        "front": len(result.get("screened_front", result["front"])),
        "backbone": {group: result["backbone"]["screen"][group] for group in ("harmful", "benign")},
        "separation": result.get("separation"),
        "chosen": chosen.get("params"),
        "chosen_final": final and {group: final[group] for group in ("harmful", "benign")} | {"kl": final["kl"]},
        "cosine": geometry.get("cosine"),
        "sign_disagreement": geometry.get("sign_disagreement"),
        "overlap_jaccard": (geometry.get("regions") or {}).get("overlap_jaccard"),
    }


def paired_row(variant: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Mean changes from ``reference`` to ``variant`` over trials at identical knobs (short budget)."""

    def complete(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {json.dumps(t["params"], sort_keys=True): t for t in result["trials"] if t["state"] == "complete"}

    ours, theirs = complete(variant), complete(reference)
    shared = sorted(set(ours) & set(theirs), key=lambda knobs: ours[knobs]["trial"])
    row: dict[str, Any] = {"matched_trials": len(shared)}
    measures = {
        "harmful": lambda t: t["harmful"],
        "benign": lambda t: t["benign"],
        "separation": lambda t: t["harmful"] - t["benign"],
    }
    for name, measure in measures.items():
        after = [measure(ours[k]) for k in shared]
        before = [measure(theirs[k]) for k in shared]
        change = [a - b for a, b in zip(after, before, strict=True)]
        row[name] = {"mean_change": sum(change) / len(change) if change else None, "ci": None, "p": None}
        if len(shared) >= 2 and after != before:  # a paired test needs two pairs and some difference
            test = stats.ttest_rel(after, before)
            low, high = test.confidence_interval(0.95)
            row[name].update(ci=[float(low), float(high)], p=float(test.pvalue))
    return row


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(change: dict[str, Any] | None) -> str:
        if change is None or change["mean_change"] is None:
            return "—"
        interval = f" [{change['ci'][0]:+.1f}, {change['ci'][1]:+.1f}], p {change['p']:.2g}" if change["ci"] else ""
        return f"{change['mean_change']:+.1f}{interval}"

    lines = [
        "",
        "## Paired with the reference study of the same backbone, at identical knobs",
        "",
        "Mean change in refusal (points, short budget) over the trials both studies ran at the same knobs; "
        "95 % t interval and paired t-test p. Separation = harmful refusal minus benign refusal (up is better).",
        "",
        "| study | reference | matched trials | harmful refusal | benign refusal | separation |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        paired = row["paired"] or {}
        lines.append(
            f"| {row['study']} | {paired.get('reference', 'none of this backbone and dtype')} | "
            f"{paired.get('matched_trials', 0)} | {cell(paired.get('harmful'))} | {cell(paired.get('benign'))} | "
            f"{cell(paired.get('separation'))} |"
        )
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Tuning variants: validation fronts and patch geometry",
        "",
        f"command: `{command}`",
        "",
        "Refusal in %. Separation columns on the short budget every trial was judged with; the chosen point "
        "judged again with the full budget (95 % Wilson interval).",
        "",
        "| study | model | trials | front | backbone harmful / benign | benign refusal, no safety loss | "
        "harmful refusal, no benign rise | better on both | chosen knobs | chosen harmful | chosen benign | KL | "
        "cos(P_s, P_o) | signs differ | region overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        separation = row["separation"] or {}
        final = row["chosen_final"]

        def rate(group: str, final: dict[str, Any] | None = final) -> str:
            if not final:
                return "—"
            return f"{final[group]['refusal']:.1f} [{final[group]['ci'][0]:.1f}, {final[group]['ci'][1]:.1f}]"

        lines.append(
            f"| {row['study']} | {row['model']} ({row['compute_dtype'] or '?'}) | {row['trials']} | {row['front']} | "
            f"{fmt(row['backbone']['harmful'])} / {fmt(row['backbone']['benign'])} | "
            f"{fmt(separation.get('benign_at_no_safety_loss'))} | {fmt(separation.get('harmful_at_no_benign_rise'))} | "
            f"{'yes' if separation.get('separates') else 'no'} | {knobs_text(row['chosen'] or {})} | {rate('harmful')} | "
            f"{rate('benign')} | {fmt(final and final['kl'], 4)} | {fmt(row['cosine'], 2)} | "
            f"{fmt(row['sign_disagreement'] and 100 * row['sign_disagreement'], 0)} % | {fmt(row['overlap_jaccard'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="tune result JSON files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variants"))
    parser.add_argument(
        "--paired-with",
        type=Path,
        nargs="+",
        default=[],
        help="reference studies' JSON, one per backbone: compare each study with its own backbone's at identical knobs",
    )
    args = parser.parse_args()
    missing = [str(path) for path in [*args.results, *args.paired_with] if not path.is_file()]
    if missing:
        sys.exit(f"error: no tune result at {missing[0]}; run the study first (safepatching tune CONFIG)")
    command = shlex.join(["python", *sys.argv])
    results = [json.loads(path.read_text()) for path in args.results]
    rows = [variant_row(result) for result in results]
    text = markdown(rows, command)
    if args.paired_with:
        references = {}
        for path in args.paired_with:
            reference = json.loads(path.read_text())
            backbone = (reference["model"], reference.get("compute_dtype"))
            if backbone in references:
                sys.exit(f"error: two references for {backbone[0]} ({backbone[1]}): give one per backbone")
            references[backbone] = path, reference
        for row, result in zip(rows, results, strict=True):
            match = references.get((row["model"], row["compute_dtype"]))
            row["paired"] = match and {"reference": str(match[0])} | paired_row(result, match[1])
        text += paired_markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(with_extension(args.out, "json"), {"command": command, "variants": rows})
    write_text_atomic(with_extension(args.out, "md"), text)
    print(text)
    separating = sum(bool((row["separation"] or {}).get("separates")) for row in rows)
    print(f"separates: {separating} of {len(rows)}")


if __name__ == "__main__":
    main()
