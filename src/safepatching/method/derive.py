"""Patch derivation: fine-tune on harmful pairs and keep the weight difference as a patch.

Gradient ascent on the harmful responses' NLL unlearns them (the safety patch); gradient descent
on the same pairs loosens refusals (the over-safety patch). NPO (negative preference
optimisation, Zhang et al. 2024) is the bounded alternative to ascent, a baseline of the paper:
loss -(2/beta) log sigmoid(-beta (log p(y|x) - log p_ref(y|x))) with sequence log-probabilities and
the untouched backbone as reference. Ascent and NPO stop as soon as the mean response NLL of a
step exceeds the first step's by ``ascent_max_nll_increase`` nats per token (or at max_steps /
the end of the epochs). A step's NLL is measured before its update; ``ascent_stop`` says whether
that overshooting update is still applied.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.identity import cache_identity
from safepatching.config.settings import DeriveConfig
from safepatching.data.chat import collate, encode_pair, encode_question
from safepatching.data.sources import Example
from safepatching.errors import TrainingError
from safepatching.method.dense import DensePatch, holds_base
from safepatching.method.device_profile import DerivationProfile, derivation_profile
from safepatching.method.memory import ModelSize, is_target
from safepatching.method.objectives import autocast, logit_rows, npo_losses, response_logprobs, response_nlls
from safepatching.models.device import device_memory
from safepatching.models.precision import DTYPES
from safepatching.storage.cache import fingerprint, release_memory
from safepatching.storage.files import atomic_dir, load_tensors, read_json, save_tensors, write_json
from safepatching.storage.shards import tensor_digest

log = logging.getLogger(__name__)
Direction = Literal["ascent", "descent", "npo"]
UNLEARNING = ("ascent", "npo")  # directions that raise the NLL and stop at its ceiling


def target_parameter_names(model: torch.nn.Module, target_modules: list[str]) -> list[str]:
    """Parameters (weights and biases) of modules whose last name component is a target."""
    wanted = set(target_modules)
    names = [name for name, _ in model.named_parameters() if is_target(name, wanted)]
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


def make_loader(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Example],
    max_length: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    reference: torch.nn.Module | None = None,
    compute_dtype: torch.dtype = torch.float32,
    loss_on_questions: bool = False,
) -> DataLoader:
    """Batches of encoded pairs (the loss on the responses, or with ``loss_on_questions`` on the
    questions); with ``reference`` each example also carries its reference log-prob (NPO)."""
    if loss_on_questions:
        encoded = [encode_question(tokenizer, p.prompt, max_length) for p in pairs]
    else:
        encoded = [encode_pair(tokenizer, p.prompt, p.response or "", max_length) for p in pairs]
    truncated = sum(item["truncated"] for item in encoded)
    if truncated:  # by design on the defaults: the message stays the same so it is shown once
        log.warning(
            "training pairs longer than derive.max_length=%d tokens are cut to it (the prompt keeps its end, "
            "the response its start); raise derive.max_length to train on more of each response",
            max_length,
        )
        log.info("%d of %d pairs were cut at %d tokens", truncated, len(encoded), max_length)
    if reference is not None:
        with torch.no_grad(), autocast(reference, compute_dtype):
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                logprobs, _ = response_logprobs(reference, collate(chunk, tokenizer.pad_token_id))
                for item, value in zip(chunk, logprobs.tolist(), strict=True):
                    item["reference_logprob"] = value
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        encoded,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id),
    )


@dataclass
class TrainingState:
    """Where the loop is: optimizer steps taken, their NLLs, and the position in the data."""

    history: list[float] = field(default_factory=list)
    epoch: int = 0
    batches_done: int = 0


class Checkpointer:
    """Saves trainable weights, optimizer state, RNG state and loop position; restores them exactly.

    A checkpoint is only used when its key (direction, settings, seed, data and backbone) matches,
    so a changed run never resumes from a stale one. Writes are atomic, so ``kill -9`` mid-write
    leaves the previous checkpoint intact.
    """

    def __init__(self, directory: Path | None, key: str, settings: DeriveConfig):
        self.directory = None if directory is None else Path(directory)
        self.key = key
        self.settings = settings
        self.last_save = time.monotonic()

    def due(self, steps: int) -> bool:
        if self.directory is None:
            return False
        every, minutes = self.settings.checkpoint_every_steps, self.settings.checkpoint_every_minutes
        return bool(every and steps % every == 0) or bool(minutes and time.monotonic() - self.last_save >= 60 * minutes)

    def save(self, trainable: torch.nn.Module, optimizer, state: TrainingState, epoch_length: int) -> None:
        weights = {n: p.detach() for n, p in trainable.named_parameters() if p.requires_grad}
        position = asdict(state)
        if state.batches_done == epoch_length:  # the epoch is finished: resume at the next one
            position.update(epoch=state.epoch + 1, batches_done=0)
        with atomic_dir(self.directory) as staging:
            save_tensors(staging / "trainable.safetensors", weights)
            torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, staging / "optimizer.pt")
            write_json(staging / "state.json", {"key": self.key, **position})
        self.last_save = time.monotonic()

    def restore(self, trainable: torch.nn.Module, optimizer) -> TrainingState:
        """Load a matching checkpoint into the model and optimizer; a fresh state when there is none."""
        if self.directory is None or not (self.directory / "state.json").is_file():
            return TrainingState()
        saved = read_json(self.directory / "state.json")
        if saved.pop("key", None) != self.key:
            log.warning("ignoring checkpoint %s: it was made with other settings or data", self.directory)
            return TrainingState()
        weights = load_tensors(self.directory / "trainable.safetensors")
        extra = torch.load(self.directory / "optimizer.pt", weights_only=True)
        with torch.no_grad():
            for name, param in trainable.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["rng"])
        state = TrainingState(**saved)
        log.warning("resuming derivation from %s at step %d", self.directory, len(state.history))
        return state


def require_float32_masters(model: torch.nn.Module, names: list[str]) -> None:
    """Derivation updates float32 master weights: AdamW's small steps round away in bf16 or fp16."""
    params = dict(model.named_parameters())
    low = [name for name in names if params[name].dtype != torch.float32]
    if low:
        raise TrainingError(
            f"derivation needs float32 master weights, but {low[0]} is {params[low[0]].dtype}.",
            "load the backbone in float32 (load_model(..., training=True)); compute_dtype then sets autocast",
        )


def derive_patch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Example],
    direction: Direction,
    settings: DeriveConfig,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    compute_dtype: str = "float32",
    base: Callable[[str], torch.Tensor] | None = None,
) -> DensePatch:
    """Fine-tune ``model`` in ``direction`` on the pairs and return the patch; the model is restored.

    With ``checkpoint_dir`` the loop checkpoints as configured and resumes from a matching
    checkpoint, giving the same patch as an uninterrupted run. ``compute_dtype`` is the autocast
    dtype (weights stay float32); ``base`` reads the untrained weights from the backbone's files,
    so no copy of them is held while training.
    """
    set_seed(seed)
    names = target_parameter_names(model, settings.target_modules)
    require_float32_masters(model, names)
    mixed = DTYPES[compute_dtype]
    original = _original_weights(model, names, base)
    device = next(model.parameters()).device
    profile = derivation_profile(settings, ModelSize.of_model(model, names), device_memory(device))
    passes = profile.batches_per_pass
    key = fingerprint(
        direction,
        cache_identity(settings),
        seed,
        pairs_digest(pairs),
        tensor_digest(original(names[0])),
        compute_dtype,
        *([f"batches_per_pass={passes}"] if passes > 1 else []),  # a checkpoint's position counts passes
    )
    loader = make_loader(  # a pass's rows are its batches in order: the shuffle does not depend on the size
        tokenizer,
        pairs,
        settings.max_length,
        settings.batch_size * passes,
        seed,
        shuffle=True,
        reference=model if direction == "npo" else None,  # still untouched here
        compute_dtype=mixed,
    )
    accelerator, wrapped, optimizer, loader = _training_setup(model, names, settings, profile, loader)
    checkpointer = Checkpointer(checkpoint_dir, key, settings)
    steps_per_epoch = math.ceil(len(loader) / (settings.gradient_accumulation_steps // passes))
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch
    stop_reason = "max_steps" if settings.max_steps else "epochs"
    overshoot_dropped = False
    wrapped.train()
    bar = tqdm(total=total_steps, desc=f"derive ({direction})", disable=not progress)
    step_losses: list[torch.Tensor] = []
    with logit_rows(profile.logit_rows):  # the profile's chunking, for this training only
        try:
            state = checkpointer.restore(accelerator.unwrap_model(wrapped), optimizer)
            history = state.history
            bar.update(len(history))
            for _ in range(state.epoch):  # replay earlier epochs' shuffles so the data order matches
                for _ in loader:
                    pass
            while len(history) < total_steps and stop_reason not in ("nll_ceiling", "nll_floor"):
                for position, batch in enumerate(loader):
                    if position < state.batches_done:
                        continue
                    with accelerator.accumulate(wrapped):
                        losses, nlls = _batch_losses(wrapped, batch, direction, settings, mixed, len(history) + 1)
                        accelerator.backward(losses.sum() / passes)  # as if each batch had its own pass
                        step_losses.extend(nlls.detach().unbind())
                        if accelerator.sync_gradients:
                            step_nll = accelerator.reduce(torch.stack(step_losses).mean(), "mean").item()
                            step_losses.clear()
                            history.append(step_nll)
                            stop_reason = _early_stop(direction, history, settings) or stop_reason
                            accelerator.clip_grad_norm_(wrapped.parameters(), settings.max_grad_norm)
                        overshoot_dropped = stop_reason == "nll_ceiling" and settings.ascent_stop == "before_overshoot"
                        if not overshoot_dropped:
                            optimizer.step()
                        optimizer.zero_grad()
                    if not accelerator.sync_gradients:
                        continue
                    state.batches_done = position + 1
                    bar.update(1)
                    bar.set_postfix(nll=f"{step_nll:.3f}")
                    if stop_reason in ("nll_ceiling", "nll_floor") or len(history) >= total_steps:
                        break
                    if checkpointer.due(len(history)):
                        checkpointer.save(accelerator.unwrap_model(wrapped), optimizer, state, len(loader))
                else:
                    state.epoch, state.batches_done = state.epoch + 1, 0
        finally:  # the backbone is restored even when training fails
            bar.close()
            trained = _finish_trainable(accelerator.unwrap_model(wrapped), settings)
            del optimizer, wrapped
            accelerator.free_memory()  # the optimizer's state (GBs) goes before the deltas are made
            release_memory()
            deltas = _take_deltas(trained, original, names)
            model.requires_grad_(True)
            if profile.recompute_activations:
                model.activation_checkpointing_disable()
            model.eval()
    info = {
        "direction": direction,
        "steps": len(history),
        "planned_steps": total_steps,
        "stop_reason": stop_reason,
        "updates": len(history) - overshoot_dropped,
        "nll_history": history,
        "settings": settings.model_dump(mode="json"),
        "seed": seed,
        "compute_dtype": compute_dtype,
        "device_profile": profile.record(),
        "num_pairs": len(pairs),
        "pairs_sha256": pairs_digest(pairs),
    }
    return DensePatch(deltas, info)


def _training_setup(
    model: PreTrainedModel,
    names: list[str],
    settings: DeriveConfig,
    profile: DerivationProfile,
    loader: DataLoader,
) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """The trainable model, its optimizer and the loader, prepared by accelerate where the model is
    (load_model puts it on the GPU), with the profile's recomputation and optimizer."""
    trainable = _prepare_trainable(model, names, settings)
    if profile.recompute_activations:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.gradient_accumulation_steps // profile.batches_per_pass,
        cpu=next(model.parameters()).device.type == "cpu",
    )
    optimizer = torch.optim.AdamW(  # per_tensor: no transient copy of every trainable weight
        [p for p in trainable.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        weight_decay=0.0,
        foreach=profile.optimizer == "foreach",
        fused=profile.optimizer == "fused" or None,
    )
    wrapped, optimizer, loader = accelerator.prepare(trainable, optimizer, loader)
    return accelerator, wrapped, optimizer, loader


def _batch_losses(
    model: torch.nn.Module, batch: dict, direction: Direction, settings: DeriveConfig, mixed: torch.dtype, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One loss and response NLL per batch in the pass (under autocast); a non-finite NLL stops training."""
    with autocast(model, mixed):
        if direction == "npo":
            losses, nlls = npo_losses(model, batch, settings.npo_beta, settings.batch_size)
        else:
            nlls = response_nlls(model, batch, settings.batch_size)
            losses = -nlls if direction == "ascent" else nlls
    if not torch.isfinite(nlls).all():
        raise TrainingError(
            f"the response NLL became {nlls.max().item()} at step {step} ({direction}).",
            "lower derive.learning_rate or derive.ascent_max_nll_increase",
        )
    return losses, nlls


def _early_stop(direction: Direction, history: list[float], settings: DeriveConfig) -> str | None:
    """Why training stops after the latest step's NLL, if it does: unlearning past its ceiling above
    the first step's NLL, descent under its floor."""
    if direction in UNLEARNING and history[-1] > history[0] + settings.ascent_max_nll_increase:
        return "nll_ceiling"
    if direction == "descent" and history[-1] < settings.descent_nll_floor:
        return "nll_floor"
    return None


def _original_weights(
    model: torch.nn.Module, names: list[str], base: Callable[[str], torch.Tensor] | None
) -> Callable[[str], torch.Tensor]:
    """The target weights before training, by name: read on demand from ``base`` (the backbone's
    files) when it holds exactly the model's weights, which saves a copy of every target weight;
    otherwise a copy taken now."""
    if (files := holds_base(model, names, base)) is not None:
        return lambda name: files(name).float()
    params = dict(model.named_parameters())
    copies = {name: params[name].detach().clone() for name in names}
    return copies.__getitem__


def _take_deltas(
    trained: torch.nn.Module, original: Callable[[str], torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """Trained minus original weights, held in CPU memory (a GPU keeps room for the model); the
    original weights are copied back into the model."""
    deltas = {}
    with torch.no_grad():
        current = dict(trained.named_parameters())
        for name in names:
            before = original(name).to(current[name].device)
            deltas[name] = (current[name].detach().float() - before.float()).cpu().contiguous()
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


def stop_message(info: dict) -> str:
    """Why a derivation ended, in words: stopping early at the NLL ceiling or floor is by design."""
    steps, planned, history = info["steps"], info.get("planned_steps", info["steps"]), info["nll_history"]
    settings = info.get("settings", {})
    if not history:
        return f"{info['direction']} took no steps"
    if info["stop_reason"] == "nll_ceiling":
        return (
            f"{info['direction']} stopped on purpose at step {steps} of {planned}: the response NLL rose "
            f"{history[-1] - history[0]:.1f} nats above the first step's, past the ceiling "
            f"derive.ascent_max_nll_increase={settings.get('ascent_max_nll_increase')}"
        )
    if info["stop_reason"] == "nll_floor":
        return (
            f"descent stopped on purpose at step {steps} of {planned}: the response NLL fell to "
            f"{history[-1]:.2f}, under derive.descent_nll_floor={settings.get('descent_nll_floor')}"
        )
    return f"{info['direction']} ran all {steps} steps (response NLL {history[0]:.2f} -> {history[-1]:.2f})"
