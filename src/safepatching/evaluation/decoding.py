"""Decoding-time defences as generation backends (baselines of the paper).

Each is greedy decoding on a combination of two next-token log-distributions: one model under two
system prompts (ROSE, Self-CD), or two models under one prompt (SafeDecoding). Both streams keep
their own KV cache and receive the same chosen token at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import DecodingConfig
from safepatching.data.chat import chat_prompt
from safepatching.evaluation.generation import Decoder, Generator, HFGenerator, length_buckets

# (log-probs of the main stream, log-probs of the other stream, step) -> scores to take the argmax of
Combine = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Stream:
    model: PreTrainedModel
    system: str | None = None


def rose_combine(weight: float) -> Combine:
    return lambda guided, reverse, _step: guided - weight * reverse


def self_cd_combine(weight: float) -> Combine:
    return lambda plain, emphasised, _step: (1 + weight) * plain - weight * emphasised


def plausible(combine: Combine, share: float) -> Combine:
    """``combine`` over the tokens the main stream finds plausible: those it gives at least ``share``
    of its most likely token's probability (the adaptive plausibility constraint of contrastive
    decoding, Li et al. 2023). Without it, a contrast may pick a token neither stream would write,
    and replies become strings of unrelated tokens that a refusal judge reads as compliance."""
    if share <= 0:
        return combine
    floor = math.log(share)

    def constrained(main: torch.Tensor, other: torch.Tensor, step: int) -> torch.Tensor:
        keep = main >= main.max(dim=-1, keepdim=True).values + floor
        return combine(main, other, step).masked_fill(~keep, float("-inf"))

    return constrained


def safedecoding_combine(weight: float, candidates: int) -> Combine:
    """p_base + w (p_expert - p_base), over the smallest top-k shared by both that has >= candidates tokens."""

    def combine(base: torch.Tensor, expert: torch.Tensor, _step: int) -> torch.Tensor:
        shared = torch.zeros_like(base, dtype=torch.bool)
        for row in range(base.shape[0]):
            k = candidates
            while True:
                in_base = torch.zeros(base.shape[-1], dtype=torch.bool, device=base.device)
                in_expert = torch.zeros_like(in_base)
                in_base[base[row].topk(k).indices] = True
                in_expert[expert[row].topk(k).indices] = True
                in_both = in_base & in_expert
                if int(in_both.sum()) >= candidates or k >= base.shape[-1]:
                    break
                k = min(2 * k, base.shape[-1])
            shared[row] = in_both
        scores = base.exp() + weight * (expert.exp() - base.exp())
        return scores.masked_fill(~shared, float("-inf"))

    return combine


class ContrastiveGenerator:
    """Greedy decoding on ``combine`` of two streams; ``other_steps`` limits how long the second runs.
    Each stream runs apart, with its own KV cache: a stream's prompts share their system turn, which
    the prefill runs once (one batch of both streams would share nothing and prefill it for every row)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        main: Stream,
        other: Stream,
        combine: Combine,
        other_steps: int | None = None,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "generate",
    ):
        self.tokenizer, self.main, self.other, self.combine = tokenizer, main, other, combine
        self.other_steps, self.batch_size, self.progress, self.desc = other_steps, batch_size, progress, desc
        self.engines = [HFGenerator(stream.model, tokenizer, batch_size, False) for stream in (main, other)]
        self.generated_tokens = 0

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        rows = [self._rows(stream, prompts) for stream in (self.main, self.other)]
        lengths = [max(main, other) for main, other in zip(map(len, rows[0]), map(len, rows[1]), strict=True)]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        outputs = [""] * len(prompts)
        for batch in tqdm(
            length_buckets(order, lengths, self.batch_size, max_new_tokens), desc=self.desc, disable=not self.progress
        ):
            replies = self._greedy([rows[0][i] for i in batch], [rows[1][i] for i in batch], max_new_tokens)
            for index, reply in zip(batch, replies, strict=True):
                self.generated_tokens += len(reply)
                outputs[index] = self.tokenizer.decode(reply, skip_special_tokens=True).strip()
        return outputs

    def _rows(self, stream: Stream, prompts: list[str]) -> list[list[int]]:
        texts = [chat_prompt(self.tokenizer, p, stream.system) for p in prompts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _greedy(self, main_rows: list[list[int]], other_rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Each prompt's tokens, up to and including its end token."""
        decoders = [Decoder(engine, rows) for engine, rows in zip(self.engines, (main_rows, other_rows), strict=True)]
        replies: list[list[int]] = [[] for _ in main_rows]
        for step in range(max_new_tokens):
            logprobs = [torch.log_softmax(d.last_logits().float(), dim=-1) for d in decoders]
            scores = self.combine(logprobs[0], logprobs[1], step) if len(logprobs) == 2 else logprobs[0]
            token = scores.argmax(-1)
            writing = decoders[0].record(token, replies)
            if step == max_new_tokens - 1 or not bool(writing.any()):
                break
            if self.other_steps is not None and step + 1 >= self.other_steps:
                decoders = decoders[:1]  # the second stream has had its steps: stop running it
            for decoder in decoders:
                decoder.advance(token, writing)
        return replies


def make_generator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: DecodingConfig,
    batch_size: int,
    progress: bool = True,
    desc: str = "generate",
    expert: PreTrainedModel | None = None,
) -> Generator:
    """The generation backend ``settings`` asks for; SafeDecoding needs the loaded ``expert``."""
    if settings.method == "greedy":
        return HFGenerator(model, tokenizer, batch_size, progress, desc)
    common = {"batch_size": batch_size, "progress": progress, "desc": f"{desc} [{settings.method}]"}
    if settings.method == "rose":
        return ContrastiveGenerator(
            tokenizer,
            Stream(model, settings.safety_system_prompt),
            Stream(model, settings.reverse_system_prompt),
            plausible(rose_combine(settings.rose_weight), settings.plausibility),
            **common,
        )
    if settings.method == "self-cd":
        return ContrastiveGenerator(
            tokenizer,
            Stream(model),
            Stream(model, settings.safety_system_prompt),
            plausible(self_cd_combine(settings.self_cd_weight), settings.plausibility),
            **common,
        )
    if expert is None:
        raise ValueError("safedecoding needs the expert model")
    return ContrastiveGenerator(
        tokenizer,
        Stream(model),
        Stream(expert),
        safedecoding_combine(settings.safedecoding_weight, settings.safedecoding_candidates),
        other_steps=settings.safedecoding_tokens,
        **common,
    )
