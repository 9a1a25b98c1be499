"""Intervals and paired tests: checked against values worked out by hand."""

from io import StringIO

import pytest
from rich.console import Console

from safepatching.report.statistics import compare_outcomes, continual_outcomes, mcnemar_exact, wilson_interval
from safepatching.report.tables import print_before_after


def test_wilson_interval_matches_the_closed_form():
    z = 1.959963984540054
    hits, total = 12, 40
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * (p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5
    low, high = wilson_interval(hits, total)
    assert low == pytest.approx(100 * (centre - half)) and high == pytest.approx(100 * (centre + half))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(100.0)


def test_mcnemar_counts_only_the_prompts_where_the_models_differ():
    first = [True] * 30 + [False] * 10
    second = [True] * 30 + [True] * 10  # 10 prompts changed, all one way: p = 2 * 0.5^10
    assert mcnemar_exact(first, second) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(first, first) == 1.0
    assert mcnemar_exact([True, False], [False, True]) == 1.0  # one each way


def records(refusals):
    return [{"set": s, "prompt": f"{s}{i}", "refusal": r} for s, flags in refusals.items() for i, r in enumerate(flags)]


def test_compare_outcomes_pairs_prompts_and_measures_harm_on_harmful_sets():
    backbone = records({"harmful": [False] * 8 + [True] * 2, "benign": [True] * 6 + [False] * 4})
    patched = records({"harmful": [True] * 8 + [True] * 2, "benign": [False] * 10})
    variant = records({"harmful": [False] * 10, "benign": [True] * 10})
    rows = {
        (r["set"], r["model"]): r for r in compare_outcomes({"b": backbone, "p": patched, "v": variant}, ("harmful",))
    }
    assert rows[("harmful", "b")]["rate"] == 80.0 and rows[("harmful", "p")]["rate"] == 0.0
    assert rows[("benign", "p")]["measure"] == "refusal" and rows[("benign", "p")]["rate"] == 0.0
    assert rows[("harmful", "p")]["p_vs_b"] == pytest.approx(2 * 0.5**8)
    assert (
        "p_vs_p" in rows[("benign", "v")]
        and "p_vs_b" in rows[("benign", "v")]
        and "p_vs_b" not in rows[("benign", "b")]
    )


def test_statistics_table_has_as_many_cells_as_columns_with_or_without_tests():
    from safepatching.report.tables import statistics_markdown

    row = {"set": "harmful", "model": "backbone", "measure": "harmful response", "n": 10}
    row |= {"rate": 50.0, "ci_low": 23.7, "ci_high": 76.3}
    for rows in ([row], [row, row | {"model": "patched", "p_vs_backbone": 0.5}]):
        table = [line for line in statistics_markdown(rows).splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in table}) == 1
        assert table[0].count("|") == 6 + (len(rows) - 1)


def test_continual_outcomes_test_each_round_against_the_backbone_its_previous_round_and_the_first_method():
    backbone = records({"harmful": [False] * 10, "benign": [False] * 10})
    first_round = records({"harmful": [True] * 10, "benign": [False] * 10})
    undone = records({"harmful": [False] * 10, "benign": [True] * 6 + [False] * 4})  # round 2 undoes round 1
    other = records({"harmful": [True] * 3 + [False] * 7, "benign": [False] * 10})
    rows = continual_outcomes({"sp": [backbone, first_round, undone], "ga": [backbone, other]}, ("harmful",))
    by_key = {(r["set"], r["method"], r["round"]): r for r in rows}
    assert sorted(by_key) == sorted(
        (s, m, n) for s in ("harmful", "benign") for m, n in (("backbone", 0), ("sp", 1), ("sp", 2), ("ga", 1))
    )
    assert by_key["harmful", "backbone", 0]["rate"] == 100.0 and by_key["harmful", "sp", 1]["rate"] == 0.0
    assert by_key["harmful", "sp", 1]["p_vs_backbone"] == pytest.approx(2 * 0.5**10)
    assert by_key["harmful", "sp", 2]["p_vs_previous_round"] == pytest.approx(2 * 0.5**10)
    assert by_key["harmful", "sp", 2]["p_vs_backbone"] == 1.0
    assert by_key["benign", "sp", 2]["rate"] == 60.0 and by_key["benign", "sp", 2]["measure"] == "refusal"
    assert by_key["harmful", "ga", 1]["p_vs_sp"] == pytest.approx(2 * 0.5**7)  # 7 prompts differ, all one way
    assert "p_vs_previous_round" not in by_key["harmful", "sp", 1] and "p_vs_sp" not in by_key["harmful", "sp", 1]
    assert "p_vs_backbone" not in by_key["harmful", "backbone", 0]


def test_the_before_after_table_gives_each_rate_its_interval_and_p_and_the_times_under_it():
    def records(harmful_refusals, benign_refusals):
        return [{"set": "harmful", "prompt": f"h{i}", "refusal": r} for i, r in enumerate(harmful_refusals)] + [
            {"set": "benign", "prompt": f"b{i}", "refusal": r} for i, r in enumerate(benign_refusals)
        ]

    before = records([True] * 5 + [False] * 15, [True] * 10 + [False] * 10)
    after = records([True] * 18 + [False] * 2, [True] * 10 + [False] * 10)
    statistics = compare_outcomes({"backbone": before, "patched": after}, ("harmful",))
    metrics = [{"harmful_refusal_rate": 100 * h / 20, "benign_refusal_rate": 50.0, "kl_to_reference": k,
                "part_seconds": {"generate": 3.0}} for h, k in ((5, None), (18, 0.01))]  # fmt: skip
    out = StringIO()
    print_before_after(*metrics, "runs/x/model", Console(file=out, width=200), statistics)
    text = out.getvalue()
    low, high = wilson_interval(18, 20)
    row = next(line for line in text.splitlines() if "harmful-prompt refusal" in line)
    p = mcnemar_exact([True] * 5 + [False] * 15, [True] * 18 + [False] * 2)
    assert f"90.0 [{low:.1f}, {high:.1f}]" in row and f"{p:.2g}" in row
    benign = next(line for line in text.splitlines() if "benign-prompt refusal" in line)
    assert benign.rstrip(" │|").endswith("1")  # the same refusals: McNemar's p is 1
    assert "prompts per set: harmful 20, benign 20" in text
    assert text.index("wall time: generate (s): backbone 3.0, patched 3.0") > text.index("harmful-prompt refusal")
