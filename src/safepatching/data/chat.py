"""Chat formatting and tokenisation of (prompt, response) pairs, with loss only on the response (or,
for importance scored on the questions, only on the question)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None) -> str:
    """The prompt in the model's chat format, with an optional system prompt (folded into the user
    turn for templates that have no system role)."""
    if system is None:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    try:
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # noqa: BLE001 - jinja templates raise their own error types for an unsupported role
        return chat_prompt(tokenizer, f"{system}\n\n{prompt}")


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> dict[str, list[int]]:
    """Token ids of a chat-formatted pair with labels only on the response (and its end-of-turn)."""
    prefix = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    suffix = full[len(prefix) :] if full.startswith(prefix) else response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if len(prompt_ids) > max_length // 2:
        prompt_ids = prompt_ids[-(max_length // 2) :]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "truncated": truncated,
    }


def encode_question(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of a chat-formatted prompt with labels only on the question's own tokens (not the
    template around it), cut to its last ``max_length`` tokens."""
    text = chat_prompt(tokenizer, prompt)
    start = text.rfind(prompt)
    end = start + len(prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if start >= 0 and left < end and right > start else IGNORE_INDEX
        for token, (left, right) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:], "truncated": len(ids) > max_length}


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded pairs for teacher-forced training or scoring."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        attention[row, :n] = 1
    collated = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if "reference_logprob" in batch[0]:
        collated["reference_logprobs"] = torch.tensor([item["reference_logprob"] for item in batch])
    return collated
