"""Patch derivation: fine-tune on harmful pairs and keep the weight difference as a patch.

Gradient ascent on the harmful responses' NLL unlearns them (the safety patch); gradient descent
on the same pairs loosens refusals (the over-safety patch). Ascent is unbounded, so it stops as
soon as the mean response NLL of a step exceeds the first step's by ``ascent_max_nll_increase``
nats per token (or at max_steps / the end of the epochs).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config import DeriveConfig
from safepatching.data import Example, collate, encode_pair
from safepatching.errors import TrainingError
from safepatching.io import atomic_dir, read_json, save_tensors, write_json
from safepatching.shards import LazyTensors

Direction = Literal["ascent", "descent"]
PATCH_TENSORS = "deltas.safetensors"
PATCH_INFO = "patch.json"


@dataclass
class Patch:
    """Per-tensor weight deltas (theta_trained - theta) plus the settings that produced them."""

    deltas: Mapping[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def target_parameter_names(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """Parameters (weights and biases) of modules whose last name component is a target."""
    wanted = set(target_modules)
    names = [
        name
        for name, _ in model.named_parameters()
        if "." in name and name.rsplit(".", 2)[-2] in wanted and name.rsplit(".", 1)[-1] in ("weight", "bias")
    ]
    if not names:
        raise TrainingError(
            f"no parameters match target_modules {target_modules}.", "list module names that exist in this model"
        )
    return names


def pairs_digest(pairs: list[Example]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.prompt.encode())
        digest.update(b"\0")
        digest.update((pair.response or "").encode())
        digest.update(b"\1")
    return digest.hexdigest()


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token (prompt tokens carry no loss)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def make_loader(
    tokenizer: PreTrainedTokenizerBase, pairs: list[Example], max_length: int, batch_size: int, seed: int, shuffle: bool
) -> DataLoader:
    encoded = [encode_pair(tokenizer, p.prompt, p.response or "", max_length) for p in pairs]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        encoded,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id),
    )


def derive_patch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Example],
    direction: Direction,
    settings: DeriveConfig,
    seed: int = 0,
    progress: bool = True,
) -> Patch:
    """Fine-tune ``model`` in ``direction`` on the pairs and return the patch; the model is restored."""
    set_seed(seed)
    names = target_parameter_names(model, settings.target_modules)
    original = {name: p.detach().clone() for name, p in model.named_parameters() if name in set(names)}
    trainable = _prepare_trainable(model, names, settings)
    loader = make_loader(tokenizer, pairs, settings.max_length, settings.batch_size, seed, shuffle=True)
    accelerator = Accelerator(gradient_accumulation_steps=settings.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(
        [p for p in trainable.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=0.0
    )
    wrapped, optimizer, loader = accelerator.prepare(trainable, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / settings.gradient_accumulation_steps)
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch
    sign = -1.0 if direction == "ascent" else 1.0
    history: list[float] = []
    stop_reason = "max_steps" if settings.max_steps else "epochs"
    wrapped.train()
    bar = tqdm(total=total_steps, desc=f"derive ({direction})", disable=not progress)
    step_losses: list[torch.Tensor] = []
    try:
        while len(history) < total_steps and stop_reason not in ("nll_ceiling", "nll_floor"):
            for batch in loader:
                with accelerator.accumulate(wrapped):
                    nll = response_nll(wrapped, batch)
                    if not torch.isfinite(nll):
                        raise TrainingError(
                            f"the response NLL became {nll.item()} at step {len(history) + 1} ({direction}).",
                            "lower derive.learning_rate or derive.ascent_max_nll_increase",
                        )
                    accelerator.backward(sign * nll)
                    step_losses.append(nll.detach())
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(wrapped.parameters(), settings.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step_nll = accelerator.reduce(torch.stack(step_losses).mean(), "mean").item()
                step_losses.clear()
                history.append(step_nll)
                bar.update(1)
                bar.set_postfix(nll=f"{step_nll:.3f}")
                if direction == "ascent" and step_nll > history[0] + settings.ascent_max_nll_increase:
                    stop_reason = "nll_ceiling"
                elif direction == "descent" and step_nll < settings.descent_nll_floor:
                    stop_reason = "nll_floor"
                if stop_reason in ("nll_ceiling", "nll_floor") or len(history) >= total_steps:
                    break
    finally:  # the backbone is restored even when training fails
        bar.close()
        deltas = _take_deltas(_finish_trainable(accelerator.unwrap_model(wrapped), settings), original)
        model.requires_grad_(True)
        model.eval()
    info = {
        "direction": direction,
        "steps": len(history),
        "stop_reason": stop_reason,
        "nll_history": history,
        "settings": settings.model_dump(mode="json"),
        "seed": seed,
        "num_pairs": len(pairs),
        "pairs_sha256": pairs_digest(pairs),
    }
    return Patch(deltas, info)


def _take_deltas(trained: torch.nn.Module, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained minus original weights; the original weights are copied back into the model."""
    deltas = {}
    with torch.no_grad():
        current = dict(trained.named_parameters())
        for name, before in original.items():
            deltas[name] = (current[name].detach().float() - before.float()).contiguous()
            current[name].copy_(before)
    return deltas


def _prepare_trainable(model: PreTrainedModel, names: list[str], settings: DeriveConfig) -> torch.nn.Module:
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=0.0,
            target_modules=settings.target_modules,
        )
        return get_peft_model(model, config)
    selected = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
    return model


def _finish_trainable(trained: torch.nn.Module, settings: DeriveConfig) -> torch.nn.Module:
    """For LoRA, fold B@A*scale into the base weights so the patch is a full delta per tensor."""
    if settings.method == "lora":
        return trained.merge_and_unload()
    return trained


def save_patch(patch: Patch, directory: Path, extra_info: dict[str, Any] | None = None) -> None:
    with atomic_dir(directory) as staging:
        save_tensors(staging / PATCH_TENSORS, patch.deltas)
        write_json(staging / PATCH_INFO, {**patch.info, **(extra_info or {})})


def load_patch(directory: Path) -> Patch:
    """A saved patch whose deltas are read from disk tensor by tensor, when used."""
    directory = Path(directory)
    return Patch(LazyTensors(directory / PATCH_TENSORS), read_json(directory / PATCH_INFO))
