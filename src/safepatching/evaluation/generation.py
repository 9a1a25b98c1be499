"""Generation backends: batched greedy decoding with transformers (left padding, length bucketing,
KV cache) and, where vLLM is installed and a GPU is present, the same greedy decoding with vLLM."""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from safepatching.data.chat import chat_prompt


class Generator(Protocol):
    """What the evaluation needs from a generation backend."""

    generated_tokens: int  # new tokens produced so far (up to and including each reply's end token)
    desc: str  # the progress bar's label; the suite names the prompt set in it

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]: ...


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a reply: the generation config's (one or several) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def reply_length(tokens: list[int], eos_ids: set[int]) -> int:
    """Tokens a reply really took: up to and including its first end token (padding after it is free)."""
    return next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), len(tokens))


ROW_TOKENS = 128  # a batch holds batch_size rows of this many tokens, or fewer rows of longer ones (the
# prefill's attention grows with rows x length², so jailbreak templates of ~1,500 tokens go ~10 at a time)


class HFGenerator:
    """Greedy decoding with transformers; prompts of similar length share a batch, and a batch ends
    as soon as every row has produced an end token."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "generate",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.desc = desc
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.generated_tokens = 0

    def prefill(self, rows: list[list[int]]):
        """Run the prompts into a new KV cache and return the model's output (logits of each row's last
        position) with the attention mask and positions so far. The token prefix every row shares
        (the chat template's system turn, often) is run once and its cache copied to every row; each
        row's own tokens are left-padded after it."""
        device = next(self.model.parameters()).device
        shared = min(shared_prefix_length(rows), min(map(len, rows)) - 1)
        cache = DynamicCache(config=self.model.config)
        if shared:
            prefix = torch.tensor([rows[0][:shared]], device=device)
            self.model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(rows))
        width = max(len(row) for row in rows) - shared
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r) + shared) + r[shared:] for r in rows], device=device)
        own = torch.tensor([[0] * (width - len(r) + shared) + [1] * (len(r) - shared) for r in rows], device=device)
        attention_mask = torch.cat([torch.ones((len(rows), shared), dtype=own.dtype, device=device), own], dim=-1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out, attention_mask, position_ids

    @torch.inference_mode()
    def greedy(self, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Each prompt's greedy tokens, up to and including its end token."""
        decoder = Decoder(self, rows)
        replies: list[list[int]] = [[] for _ in rows]
        for step in range(max_new_tokens):
            token = decoder.last_logits().argmax(-1)
            writing = decoder.record(token, replies)
            if step == max_new_tokens - 1 or not bool(writing.any()):
                break
            decoder.advance(token, writing)
        return replies

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Replies to user prompts, each formatted with the model's chat template."""
        return self.generate_texts([chat_prompt(self.tokenizer, p) for p in prompts], max_new_tokens)

    def generate_texts(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """Continuations of already formatted texts."""
        tokens = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
        outputs: list[str] = [""] * len(texts)
        batches = length_buckets(order, [len(ids) for ids in tokens], self.batch_size, max_new_tokens)
        for batch in tqdm(batches, desc=self.desc, disable=not self.progress):
            for index, reply in zip(batch, self.greedy([tokens[i] for i in batch], max_new_tokens), strict=True):
                self.generated_tokens += len(reply)
                outputs[index] = self.tokenizer.decode(reply, skip_special_tokens=True).strip()
        return outputs


class Decoder:
    """One model's greedy decoding state over a batch of prompts: its KV cache, attention mask and
    positions. A row that has ended leaves the batch (its KV cache rows are dropped), so later steps
    compute only for rows still writing; the prompts' logits are computed for their last position alone."""

    def __init__(self, engine: HFGenerator, rows: list[list[int]]):
        self.model = engine.model
        self.out, self.attention_mask, self.position_ids = engine.prefill(rows)
        self.active = torch.arange(len(rows))  # the prompts still writing, by original index
        self.eos = torch.tensor(sorted(engine.eos_ids), device=self.attention_mask.device)

    def last_logits(self) -> torch.Tensor:
        """Next-token logits, one row per prompt still writing."""
        return self.out.logits[:, -1]

    def record(self, token: torch.Tensor, replies: list[list[int]]) -> torch.Tensor:
        """Append each active prompt's chosen token to its reply; return which prompts go on writing."""
        for row, value in zip(self.active.tolist(), token.tolist(), strict=True):
            replies[row].append(value)
        return ~torch.isin(token, self.eos.to(token.device))

    def advance(self, token: torch.Tensor, writing: torch.Tensor) -> None:
        """Drop the prompts that ended and run the chosen tokens of the others through the model."""
        if not bool(writing.all()):
            keep = writing.nonzero().squeeze(-1)
            token = token[keep]
            self.out.cache.batch_select_indices(keep)
            self.attention_mask, self.position_ids = self.attention_mask[keep], self.position_ids[keep]
            self.active = self.active[keep.cpu()]
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=-1)
        self.position_ids = self.position_ids[:, -1:] + 1
        self.out = self.model(
            input_ids=token.to(self.attention_mask.device).unsqueeze(-1),
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            cache=self.out.cache,
            use_cache=True,
        )


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens every row has in common."""
    shortest = min(map(len, rows))
    return next((i for i in range(shortest) if any(row[i] != rows[0][i] for row in rows)), shortest)


def length_buckets(order: list[int], lengths: list[int], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Consecutive runs of ``order`` (indices sorted by prompt length) of at most ``batch_size`` rows
    and at most batch_size * ROW_TOKENS padded tokens, so long prompts (jailbreak templates) do not
    take a full batch's memory each."""
    budget = batch_size * ROW_TOKENS
    batches: list[list[int]] = []
    for index in order:
        width = lengths[index] + max_new_tokens  # the longest row so far, as prompts come sorted
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * width <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def vllm_available() -> bool:
    """vLLM is used only where it is installed and a CUDA device is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VLLMGenerator:
    """Greedy decoding with vLLM from a model folder or hub id (vLLM loads weights itself, so it
    serves only models whose in-memory weights are those of ``model_path``)."""

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        progress: bool = True,
    ):
        from vllm import LLM, SamplingParams

        self.tokenizer = tokenizer
        self.progress = progress
        self.desc = "generate"  # vLLM draws its own bar
        self.sampling = SamplingParams
        self.engine = LLM(
            model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False
        )
        self.generated_tokens = 0

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        texts = [chat_prompt(self.tokenizer, p) for p in prompts]
        params = self.sampling(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.engine.generate(texts, params, use_tqdm=self.progress)
        self.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text.strip() for o in outputs]
