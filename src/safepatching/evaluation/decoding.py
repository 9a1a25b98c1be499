"""Decoding-time defences as generation backends (baselines of the paper).

Each is greedy decoding on a combination of two next-token log-distributions: one model under two
system prompts (ROSE, Self-CD), or two models under one prompt (SafeDecoding). Both streams keep
their own KV cache and receive the same chosen token at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.settings import DecodingConfig
from safepatching.data.chat import chat_prompt
from safepatching.evaluation.generation import Generator, HFGenerator, eos_token_ids, reply_length

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
    """Greedy decoding on ``combine`` of two streams; ``other_steps`` limits how long the second runs."""

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
        self.eos_ids = eos_token_ids(main.model, tokenizer)
        self.generated_tokens = 0

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        lengths = [len(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        outputs = [""] * len(prompts)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=self.desc, disable=not self.progress):
            for index, text in zip(
                batch, self._generate_batch([prompts[i] for i in batch], max_new_tokens), strict=True
            ):
                outputs[index] = text
        return outputs

    def _encode(self, stream: Stream, prompts: list[str]) -> dict[str, torch.Tensor]:
        texts = [chat_prompt(self.tokenizer, p, stream.system) for p in prompts]
        previous_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = previous_side
        device = next(stream.model.parameters()).device
        return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        states = [_StreamState(stream, self._encode(stream, prompts)) for stream in (self.main, self.other)]
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        chosen: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            other_active = self.other_steps is None or step < self.other_steps
            main_logprobs = states[0].next_logprobs()
            scores = self.combine(main_logprobs, states[1].next_logprobs(), step) if other_active else main_logprobs
            token = scores.argmax(-1).cpu()
            token = torch.where(finished, torch.full_like(token, self.tokenizer.pad_token_id), token)
            chosen.append(token)
            finished |= torch.isin(token, torch.tensor(sorted(self.eos_ids)))
            if bool(finished.all()):
                break
            for state in states if other_active else states[:1]:
                state.feed(token)
        replies = torch.stack(chosen, dim=1) if chosen else torch.empty((len(prompts), 0), dtype=torch.long)
        texts = []
        for row in replies.tolist():
            length = reply_length(row, self.eos_ids)
            self.generated_tokens += length
            texts.append(self.tokenizer.decode(row[:length], skip_special_tokens=True).strip())
        return texts


class _StreamState:
    """One stream's left-padded inputs, positions and KV cache during decoding."""

    def __init__(self, stream: Stream, encoded: dict[str, torch.Tensor]):
        self.model = stream.model
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None  # the first call runs the whole prompt (prefill), later ones one token

    def next_logprobs(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def feed(self, token: torch.Tensor) -> None:
        """The chosen token becomes the next input."""
        self.input_ids = token.to(self.input_ids.device).unsqueeze(-1)
        self.position_ids = self.position_ids[:, -1:] + 1
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.input_ids)], dim=-1)


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
            rose_combine(settings.rose_weight),
            **common,
        )
    if settings.method == "self-cd":
        return ContrastiveGenerator(
            tokenizer,
            Stream(model),
            Stream(model, settings.safety_system_prompt),
            self_cd_combine(settings.self_cd_weight),
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
