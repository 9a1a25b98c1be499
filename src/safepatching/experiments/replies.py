"""The reply stages: training data that a model writes, generated once and cached.

- Over-safety replies: when over_safety.train gives prompts without replies, an answerer writes
  them (another model, or the backbone plus the paper's over-safety patch, which complies readily);
  the refusal judge and the loop check drop the unusable ones.
- Own replies: SNIP scored on the backbone's own greedy replies to the harmful questions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from safepatching.data.sources import Example
from safepatching.errors import DataError
from safepatching.evaluation.judges.registry import judge_all
from safepatching.evaluation.judges.rules import looping
from safepatching.method.dense import patched
from safepatching.models.loading import load_model
from safepatching.report.results import read_jsonl, write_jsonl
from safepatching.storage.cache import cached

if TYPE_CHECKING:
    from safepatching.experiments.patch_stages import PatchStages

log = logging.getLogger(__name__)


def over_safety_replies(stages: PatchStages, pairs: list[Example]) -> list[Example]:
    """The over-safety prompts with generated, judged and cached (over_safety_replies/) replies."""
    directory = stages.out / "over_safety_replies"
    config, backbone = stages.config, stages.backbone
    replies = config.over_safety.replies

    def answer(model, tokenizer, prompts: list[str]) -> list[str]:
        batch = config.eval.batch_size
        return backbone.answer(
            model, tokenizer, prompts, replies.max_new_tokens, batch, stages.progress, "answer over-safety prompts"
        )

    def produce() -> list[dict[str, Any]]:
        prompts = [e.prompt for e in stages.data.over_safety_prompts()]
        if replies.model:
            model, tokenizer = load_model(replies.model, loading=stages.loading)
            answers = answer(model, tokenizer, prompts)
            del model
        else:  # the backbone plus the paper's over-safety patch, which complies readily
            paper = stages.derive_one(pairs, "over_safety_paper", "descent")
            model, tokenizer = backbone.model()
            scaled = {name: replies.scale * paper.deltas[name].float() for name in paper.deltas}
            with patched(model, scaled, backbone.restore_source(model, list(scaled))):
                answers = answer(model, tokenizer, prompts)
        verdicts = judge_all(stages.judges.refusal, prompts, answers)
        rows = [
            {"prompt": p, "response": a, "refusal": v.refusal}
            for p, a, v in zip(prompts, answers, verdicts, strict=True)
        ]
        write_jsonl(directory / "replies.jsonl", rows)
        return rows

    load = lambda: read_jsonl(directory / "replies.jsonl")  # noqa: E731
    rows = cached(directory, stages.keys.replies(), produce, load, stages.meter, "over_safety_replies")
    return usable_replies(rows, config.eval.refusal_judge)


def usable_replies(rows: list[dict[str, Any]], judge: str) -> list[Example]:
    """The generated replies that comply and do not loop; a count of the rest is logged."""
    looped = [not row["refusal"] and looping(row["response"]) for row in rows]
    refused, loops = sum(row["refusal"] for row in rows), sum(looped)
    kept = [
        Example(row["prompt"], row["response"])
        for row, loop in zip(rows, looped, strict=True)
        if not row["refusal"] and not loop
    ]
    if not kept:
        raise DataError(
            f"none of the {len(rows)} generated over-safety replies complies: {refused} were refusals (judge "
            f"{judge}), {loops} looped.",
            "lower over_safety.replies.scale if they loop, raise it if they refuse, name another "
            "over_safety.replies.model, or give replies in over_safety.train.response_column",
        )
    if refused or loops:
        log.warning(
            "over_safety.train: of %d generated replies, %d refusals and %d looping ones were dropped%s",
            len(rows),
            refused,
            loops,
            "; lower over_safety.replies.scale for fewer loops" if loops else "",
        )
    return kept


def own_reply_pairs(stages: PatchStages, pairs: list[Example]) -> list[Example]:
    """The harmful questions SNIP scores, each with the backbone's own greedy reply (generated under
    autocast from the float32 weights importance holds anyway, and cached under own_replies/)."""
    directory = stages.out / "own_replies"
    settings = stages.config.importance
    prompts = [e.prompt for e in pairs[: settings.max_examples]]

    def produce() -> list[dict[str, Any]]:
        model, tokenizer = stages.backbone.model(training=True)
        replies = stages.backbone.answer(
            model, tokenizer, prompts, settings.own_reply_tokens, stages.config.eval.batch_size, stages.progress,
            "own replies",
        )  # fmt: skip
        rows = [{"prompt": p, "response": r} for p, r in zip(prompts, replies, strict=True)]
        write_jsonl(directory / "replies.jsonl", rows)
        return rows

    load = lambda: read_jsonl(directory / "replies.jsonl")  # noqa: E731
    rows = cached(directory, stages.keys.own_replies(prompts), produce, load, stages.meter, "own_replies")
    return [Example(row["prompt"], row["response"]) for row in rows]
