"""Utility tasks through lm-evaluation-harness on local files, with a tiny in-memory model."""

from __future__ import annotations

import json

import datasets
import pytest

from safepatching.config.identity import cache_identity
from safepatching.config.settings import EvalConfig, ModelLoading, UtilityConfig
from safepatching.errors import DataError
from safepatching.evaluation.utility_tasks import _gsm8k_target, evaluate_utility, utility_tasks
from safepatching.models.loading import load_model


@pytest.fixture
def utility_dir(tmp_path):
    mmlu = tmp_path / "utility" / "mmlu"
    for split, count in (("test", 12), ("dev", 5)):
        (mmlu / split).mkdir(parents=True)
        for subject in ("algebra", "history"):
            rows = [f"What is {i} plus {i} in {subject}?,{2 * i},{i},{i + 1},{3 * i},A" for i in range(count)]
            (mmlu / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    gsm8k = tmp_path / "utility" / "gsm8k"
    gsm8k.mkdir(parents=True)
    problems = [{"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i}+2={i + 2}\n#### {i + 2}"}
                for i in range(10)]  # fmt: skip
    (gsm8k / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    return tmp_path


def test_tasks_sample_the_requested_subset_with_a_seed(utility_dir):
    tasks = utility_tasks(UtilityConfig(mmlu_examples=7, gsm8k_examples=3), utility_dir)
    assert [t["task"] for t in tasks] == ["safepatching_mmlu", "safepatching_gsm8k"]
    mmlu = datasets.load_dataset("csv", **tasks[0]["dataset_kwargs"])["test"]
    assert len(mmlu) == 24 and mmlu.column_names == ["question", "A", "B", "C", "D", "answer"]
    first, second = (tasks[0]["process_docs"](mmlu) for _ in range(2))
    assert len(first) == 7 and first["question"] == second["question"]
    assert len({q.split(" in ")[1] for q in first["question"]}) == 2  # drawn across subjects
    assert _gsm8k_target({"answer": "so 1,200 in all\n#### 1,200"}) == "1200"
    assert utility_tasks(UtilityConfig(), utility_dir) == []


def test_utility_errors(tmp_path):
    with pytest.raises(DataError, match="data directory"):
        utility_tasks(UtilityConfig(mmlu_examples=5), None)
    with pytest.raises(DataError, match="MMLU"):
        utility_tasks(UtilityConfig(mmlu_examples=5), tmp_path)


def test_lm_eval_runs_offline_on_an_in_memory_model(utility_dir, tiny_model_dir, capsys):
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading())
    settings = UtilityConfig(mmlu_examples=6, gsm8k_examples=2, gsm8k_max_new_tokens=16, batch_size=4)
    scores = evaluate_utility(model, tokenizer, settings, utility_dir)
    assert "%|" in capsys.readouterr().err  # lm-eval's bars, by default
    assert set(scores) == {"mmlu_accuracy", "gsm8k_exact_match"}
    assert scores["mmlu_accuracy"] in {100 * k / 6 for k in range(7)}
    assert scores["gsm8k_exact_match"] in {0.0, 50.0, 100.0}
    assert evaluate_utility(model, tokenizer, settings, utility_dir, progress=False) == scores
    assert "%|" not in capsys.readouterr().err  # --no-progress reaches lm-eval too (its warnings stay)
    plain = settings.model_copy(update={"chat_template": False, "gsm8k_examples": 0})
    correct = evaluate_utility(model, tokenizer, plain, utility_dir, progress=False)["mmlu_accuracy"] * 6 / 100
    assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= 6  # a count of 6 questions


def test_the_plain_prompt_format_keys_results_apart_and_the_default_keeps_old_keys():
    assert "chat_template" not in cache_identity(EvalConfig())  # earlier results stay valid
    plain = EvalConfig(utility={"mmlu_examples": 5, "chat_template": False})
    assert cache_identity(plain) != cache_identity(EvalConfig(utility={"mmlu_examples": 5}))
