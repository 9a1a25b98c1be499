"""Utility: MMLU and GSM8K subsets through lm-evaluation-harness, offline, from local files.

The tasks are lm-eval task configs built here and pointed at the files in the data directory
(``utility/mmlu/{dev,test}/*.csv`` without headers, ``utility/gsm8k/test.jsonl``); the model is
passed in memory (lm-eval's ``HFLM`` wrapping our loaded model), so nothing is downloaded.
Subsets are drawn with a fixed seed from all subjects / all problems. MMLU is scored by
log-likelihood of the answer letter (accuracy); GSM8K by greedy generation, taking the last number
in the reply (exact match). Both go through the model's chat template unless
``utility.chat_template`` is off (plain completion: "... Answer: A").

With the hub, the full official tasks are one call away:
``lm_eval --model hf --model_args pretrained=MODEL_DIR --tasks mmlu,gsm8k``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from safepatching.config.settings import DATA_DIR_ENV, UtilityConfig
from safepatching.errors import DataError

LETTERS = ["A", "B", "C", "D"]
MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def _sampler(count: int, seed: int):
    def process_docs(dataset):
        return dataset.shuffle(seed=seed).select(range(min(count, len(dataset))))

    return process_docs


def _gsm8k_target(doc: dict[str, Any]) -> str:
    return doc["answer"].split("####")[-1].strip().replace(",", "")


def utility_tasks(settings: UtilityConfig, data_dir: Path | None) -> list[dict[str, Any]]:
    """lm-eval task configs for the enabled subsets, reading the data directory's files."""
    if not settings.enabled:
        return []
    if data_dir is None:
        raise DataError("the utility tasks read MMLU and GSM8K from the data directory, which is not set.",
                        f"pass --data-dir or set {DATA_DIR_ENV}")  # fmt: skip
    root = Path(data_dir) / "utility"
    tasks = []
    if settings.mmlu_examples:
        test_files = sorted(str(p) for p in (root / "mmlu" / "test").glob("*.csv"))
        dev_files = sorted(str(p) for p in (root / "mmlu" / "dev").glob("*.csv"))
        if not test_files:
            raise DataError(f"no MMLU test files in {root / 'mmlu' / 'test'}.", "check the data directory")
        tasks.append({
            "task": "safepatching_mmlu",
            "dataset_path": "csv",
            "dataset_kwargs": {"data_files": {"test": test_files, "dev": dev_files or test_files},
                               "column_names": MMLU_COLUMNS},
            "test_split": "test",
            "fewshot_split": "dev",
            "process_docs": _sampler(settings.mmlu_examples, settings.seed),
            "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
            "doc_to_choice": LETTERS,
            "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer.strip())}}",
            "target_delimiter": " ",
            "num_fewshot": settings.mmlu_fewshot,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        })  # fmt: skip
    if settings.gsm8k_examples:
        path = root / "gsm8k" / "test.jsonl"
        if not path.is_file():
            raise DataError(f"{path} does not exist.", "check the data directory")
        tasks.append({
            "task": "safepatching_gsm8k",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test",
            "process_docs": _sampler(settings.gsm8k_examples, settings.seed),
            "output_type": "generate_until",
            "doc_to_text": "Solve this math problem. Give the final answer as a number at the end.\n\n{{question}}",
            "doc_to_target": _gsm8k_target,
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": settings.gsm8k_max_new_tokens},
            "num_fewshot": 0,
            "filter_list": [{"name": "last-number", "filter": [
                {"function": "regex", "regex_pattern": r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)", "group_select": -1},
                {"function": "take_first"},
            ]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "regexes_to_ignore": [",", r"\.0+$", r"\.$"]}],
        })  # fmt: skip
    return tasks


def evaluate_utility(
    model, tokenizer, settings: UtilityConfig, data_dir: Path | None, progress: bool = True
) -> dict[str, float]:
    """MMLU accuracy and GSM8K exact match (in %) of an in-memory model; {} when both are off.
    Without ``progress`` lm-eval's bars are not drawn (it offers no switch for all of them, so its
    standard error stream is muted while it runs; failures still raise)."""
    tasks = utility_tasks(settings, data_dir)
    if not tasks:
        return {}
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=2048)
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        results = evaluator.simple_evaluate(
            model=wrapped,
            tasks=tasks,
            task_manager=TaskManager(),
            apply_chat_template=settings.chat_template,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
            bootstrap_iters=0,
            verbosity="WARNING",
        )["results"]
    scores = {}
    if "safepatching_mmlu" in results:
        scores["mmlu_accuracy"] = 100.0 * float(results["safepatching_mmlu"]["acc,none"])
    if "safepatching_gsm8k" in results:
        scores["gsm8k_exact_match"] = 100.0 * float(results["safepatching_gsm8k"]["exact_match,last-number"])
    return scores
