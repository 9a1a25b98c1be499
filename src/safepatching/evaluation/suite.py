"""The evaluation suite: safety (harmful and jailbreak sets), over-safety (benign prompts) and utility."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import DecodingConfig, EvalConfig, ModelLoading
from safepatching.data.eval_sets import EvalSets
from safepatching.errors import SafePatchingError
from safepatching.evaluation.decoding import make_generator
from safepatching.evaluation.generation import Generator, VLLMGenerator, vllm_available
from safepatching.evaluation.jailbreaks import load_templates, wrap_prompts
from safepatching.evaluation.judges.registry import Judges, judge_all
from safepatching.evaluation.judges.rules import looping
from safepatching.evaluation.metrics import (
    category_column,
    mean_token_kl,
    percent,
    rates_by_category,
    refusal_breakdown,
    response_perplexity,
)
from safepatching.evaluation.utility_tasks import evaluate_utility, utility_tasks
from safepatching.models.loading import check_model_source, load_model, weights_folder
from safepatching.models.precision import resolve_dtype


def use_vllm(settings: EvalConfig, model_source: str | None) -> bool:
    """Whether replies come from vLLM (see EvalConfig.backend); backend vllm that cannot run is an error."""
    if settings.backend == "hf":
        return False
    possible = model_source is not None and settings.decoding.method == "greedy"
    if settings.backend == "vllm":
        if not vllm_available():
            raise SafePatchingError(
                "eval.backend is vllm but vLLM is not installed or no GPU is present.",
                "pip install vllm on a GPU machine, or set eval.backend: auto",
            )
        if not possible:
            raise SafePatchingError(
                "vLLM serves only plain greedy decoding of a model loaded unchanged from a folder or hub id.",
                "set eval.backend: auto (or hf) for decoding-time defences and in-memory merges",
            )
        return True
    return possible and vllm_available()


def check_evaluation(settings: EvalConfig, judges: Judges) -> None:
    """Refuse, before any work, what evaluate_model would only fail on when it begins: a judge it
    cannot build, a jailbreak family without its templates, utility tasks without their files."""
    judges.check_evaluation_judges()
    for family in settings.jailbreaks:
        load_templates(family, judges.data_dir)
    utility_tasks(settings.utility, judges.data_dir)


def check_expert(decoding: DecodingConfig) -> None:
    """Refuse, before any work, a SafeDecoding expert that is neither a local model nor one the hub has,
    so it fails at the start of a run and not when its evaluation begins (apart from check_evaluation:
    a bench row may name a bench method as its expert instead)."""
    if decoding.method == "safedecoding":
        check_model_source(decoding.expert_model)


def reply_generator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: EvalConfig,
    loading: ModelLoading,
    model_source: str | None,
    progress: bool,
    label: str,
) -> Generator:
    """vLLM where it can serve the model (see use_vllm), else the decoding the settings name."""
    if use_vllm(settings, model_source):
        folder = str(weights_folder(model_source, loading=loading))
        return VLLMGenerator(
            folder, tokenizer, resolve_dtype(loading.compute_dtype), settings.vllm_gpu_memory_utilization, progress
        )
    expert = None
    if settings.decoding.method == "safedecoding":
        expert, _ = load_model(settings.decoding.expert_model, loading=loading)
    return make_generator(
        model, tokenizer, settings.decoding, settings.batch_size, progress, f"generate ({label})", expert
    )


class SuiteRun:
    """What one run of the suite records: each prompt set's judged replies and labels, and where the time
    went (each part's wall time; generation's time and tokens apart, for the cost columns)."""

    def __init__(self, generator: Generator, label: str):
        self.generator, self.label = generator, label
        self.records: list[dict[str, Any]] = []
        self.labels: dict[str, list[str]] = {}
        self.part_seconds: dict[str, float] = {}
        self.generation_seconds, self.generation_tokens = 0.0, 0
        self.unparsed = 0
        self.loops: list[bool] = []

    def timed(self, part: str, work, *args):
        """Run one part of the suite and record its wall time, so users see where the time goes."""
        started = time.perf_counter()
        result = work(*args)
        self.part_seconds[part] = round(time.perf_counter() - started, 1)
        return result

    def refusals(self, set_name: str, requests: list[str], prompts: list[str], judge, judge_name: str, max_new: int):
        """Generate replies to ``prompts`` (``requests``, wrapped or not), judge them against the
        requests and record them; whether each reply refused."""
        started = time.perf_counter()
        tokens_before = self.generator.generated_tokens
        self.generator.desc = f"generate ({self.label}: {set_name})"
        responses = self.generator.generate(prompts, max_new)
        self.generation_seconds += time.perf_counter() - started
        self.generation_tokens += self.generator.generated_tokens - tokens_before
        verdicts = judge_all(judge, requests, responses)
        self.part_seconds[set_name] = round(time.perf_counter() - started, 1)
        self.labels[set_name] = [v.label for v in verdicts]
        self.unparsed += sum(not v.parsed for v in verdicts)
        looped = [looping(r) for r in responses]
        self.loops.extend(looped)
        self.records.extend(
            {
                "set": set_name,
                "prompt": p,
                "request": q,
                "response": r,
                "refusal": v.refusal,
                "label": v.label,
                "judge": judge_name,
                "judge_parsed": v.parsed,
                "looping": loop,
            }  # fmt: skip
            for q, p, r, v, loop in zip(requests, prompts, responses, verdicts, looped, strict=True)
        )
        return [v.refusal for v in verdicts]

    def generation(self) -> dict[str, Any]:
        return {
            "seconds": round(self.generation_seconds, 2),
            "tokens": self.generation_tokens,
            "seconds_per_token": self.generation_seconds / max(self.generation_tokens, 1),
        }


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: EvalSets,
    settings: EvalConfig,
    reference: PreTrainedModel | list[torch.Tensor] | None = None,
    reference_harmless: list[str] | None = None,
    label: str = "model",
    progress: bool = True,
    data_dir: Path | None = None,
    generator: Generator | None = None,
    model_source: str | None = None,
    *,
    loading: ModelLoading,
    judges: Judges | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-prompt records. KL needs the reference (a model, or its ``reference_logprobs``
    on the harmless prompts) and its harmless replies.

    ``generator`` replaces plain greedy decoding of ``model`` (decoding-time defences); KL,
    perplexity and utility always score ``model`` itself. ``model_source`` names the model (demo name,
    folder, hub id) ``model``'s weights were loaded from unchanged, which lets the vLLM backend serve
    it; ``loading`` is how that model, an expert or a judge model is loaded. ``judges`` are the run's
    (built from ``settings``), so a model judge is loaded once for every model the run evaluates.
    """
    judges = judges or Judges(settings, data_dir, loading=loading)
    judge, refusal_judge = judges.harmful, judges.refusal
    if generator is None:
        generator = reply_generator(model, tokenizer, settings, loading, model_source, progress, label)
    started = time.perf_counter()
    suite = SuiteRun(generator, label)
    flags: dict[str, list[bool]] = {}
    for set_name, examples, set_judge, name, max_new in (
        ("harmful", sets.harmful, judge, settings.judge, settings.max_new_tokens),
        ("benign", sets.benign, refusal_judge, settings.refusal_judge, settings.max_new_tokens),
        ("harmless", sets.harmless, refusal_judge, settings.refusal_judge, settings.kl_max_new_tokens),
    ):
        requests = [e.prompt for e in examples]
        flags[set_name] = suite.refusals(set_name, requests, requests, set_judge, name, max_new)
    by_category = rates_by_category(sets.harmful, flags["harmful"], category_column(settings.harmful))
    by_benchmark = {}
    for name, examples in sets.safety.items():
        requests = [e.prompt for e in examples]
        refusals = suite.refusals(
            f"safety/{name}", requests, requests, judge, settings.judge, settings.max_new_tokens
        )
        by_benchmark[name] = {
            "harmful_response_rate": 100.0 - percent(refusals),
            "by_category": rates_by_category(examples, refusals, category_column(settings.safety_benchmarks.get(name))),
            "count": len(examples),
        }
    over_safety = {}
    for name, examples in sets.over_safety.items():
        requests = [e.prompt for e in examples]
        set_name = f"over_safety/{name}"
        suite.refusals(set_name, requests, requests, refusal_judge, settings.refusal_judge, settings.max_new_tokens)
        over_safety[name] = {**refusal_breakdown(suite.labels[set_name]), "count": len(examples)}
    jailbreak_rates = {}
    for family in settings.jailbreaks:
        requests = [e.prompt for e in sets.harmful[: settings.jailbreak_max_examples]]
        wrapped = wrap_prompts(requests, family, data_dir, settings.jailbreak_seed)
        refusals = suite.refusals(
            f"jailbreak/{family}", requests, wrapped, judge, settings.judge, settings.max_new_tokens
        )
        jailbreak_rates[family] = 100.0 - percent(refusals)
    metrics: dict[str, Any] = {
        "harmful_refusal_rate": percent(flags["harmful"]),
        "harmful_response_rate": 100.0 - percent(flags["harmful"]),
        "benign_refusal_rate": percent(flags["benign"]),
        **{
            f"benign_{key}": value
            for key, value in refusal_breakdown(suite.labels["benign"]).items()
            if key != "refusal_rate"
        },
        "harmless_refusal_rate": percent(flags["harmless"]),
        "harmful_response_rate_by_category": by_category,
        "jailbreak_harmful_response_rate": jailbreak_rates,
        "safety_benchmarks": by_benchmark,
        "over_safety_benchmarks": over_safety,
        "judge_unparsed": suite.unparsed,
        "looping_reply_rate": percent(suite.loops),
        "kl_to_reference": None,
        "counts": {"harmful": len(sets.harmful), "benign": len(sets.benign), "harmless": len(sets.harmless)},
    }
    if settings.utility.enabled:
        utility = suite.timed("utility", evaluate_utility, model, tokenizer, settings.utility, data_dir, progress)
        metrics.update(utility)
    if sets.perplexity:
        metrics["response_perplexity"] = suite.timed(
            "perplexity", response_perplexity, model, tokenizer, sets.perplexity
        )
    if reference is not None and reference_harmless is not None:
        prompts = [e.prompt for e in sets.harmless]
        metrics["kl_to_reference"] = suite.timed(
            "kl", mean_token_kl, model, reference, tokenizer, prompts, reference_harmless
        )
    metrics["part_seconds"] = suite.part_seconds
    metrics["generation"] = suite.generation()
    metrics["compute_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    return metrics, suite.records


def harmless_responses(records: list[dict[str, Any]]) -> list[str]:
    return [r["response"] for r in records if r["set"] == "harmless"]
