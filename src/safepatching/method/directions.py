"""Directions in the residual stream, from activations on named prompt sets, and the static weight
edit that projects one out (the first step of directional patches; see docs/method.md).

Activations are the residual stream at every layer's input, taken at the post-instruction
positions: the tokens the chat template puts after the user's message (its end of turn and the
assistant header), where refusal is decided before any reply token exists. They come from forward
passes only, in the compute dtype, and are kept in float32.

- ``mean_difference``: e.g. the refusal direction r = mean(harmful) - mean(harmless) and the
  false-refusal direction v = mean(benign-but-scary) - mean(harmless).
- ``orthogonalised``: v - lambda (v . r^) r^, v with (a share of) its refusal component removed.
- ``probe_accuracy``: whether two sets are linearly apart at a layer (a scikit-learn logistic
  regression, scored on held-out prompts).
- ``projection_deltas``: per-tensor deltas that remove (or amplify) directions in what every residual
  writer writes (the input embedding, every attention output and every MLP down projection),
  folded in float32; added to the backbone they are a patch like any other. ``configured_edits``
  turns the ``directional`` settings into those directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.directional import DirectionalConfig
from safepatching.data.chat import chat_prompt
from safepatching.errors import ConfigError, ModelError
from safepatching.method.objectives import autocast
from safepatching.models.precision import DTYPES

WRITER_SUFFIXES = ("embed_tokens.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight")
SUBLAYER_SUFFIXES = ("self_attn.o_proj", "mlp.down_proj")
PROMPT_MARKER = "\x00prompt\x00"


def post_instruction_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens the chat template puts after the user's message."""
    templated = chat_prompt(tokenizer, PROMPT_MARKER)
    suffix = templated.split(PROMPT_MARKER, 1)[1]
    return max(len(tokenizer(suffix, add_special_tokens=False).input_ids), 1)


def chat_batches(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(prompt indices, input ids, attention mask) of each batch of chat-formatted prompts. Batches
    group prompts of similar length (little padding to compute) and are left-padded, so that the
    post-instruction positions line up at the end."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[index]) for index in batch)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch], device=device)
        yield batch, ids, mask


def in_prompt_order(batches: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """The rows of (indices, rows) batches, concatenated back into prompt order."""
    indices = torch.tensor([index for batch, _ in batches for index in batch])
    return torch.cat([rows for _, rows in batches])[torch.argsort(indices)]


def sublayer_names(model: PreTrainedModel) -> list[str]:
    """The attention and MLP output projections in forward order (layer 0's attention first)."""
    return [name for name, _ in model.named_modules() if name.endswith(SUBLAYER_SUFFIXES)]


@torch.no_grad()
def activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    positions: int,
    batch_size: int = 8,
    compute_dtype: str = "float32",
    site: Literal["residual", "sublayers"] = "residual",
) -> torch.Tensor:
    """Float32 activations [prompt, site, position, hidden] at the last ``positions`` tokens of each
    chat-formatted prompt: each layer's residual input (``residual``), or the output of every
    attention and MLP output projection (``sublayers``, in ``sublayer_names`` order)."""
    names = sublayer_names(model) if site == "sublayers" else []
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out[:, -positions:]))
        for name in names
    ]
    layers = model.config.num_hidden_layers
    kept = []
    try:
        for batch, ids, mask in chat_batches(model, tokenizer, prompts, batch_size):
            with autocast(model, DTYPES[compute_dtype]):
                # the decoder alone: the output layer's logits (a quarter of a 0.5B model's compute) are not needed
                out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=not names, use_cache=False)
            rows = [seen[name] for name in names] if names else [h[:, -positions:] for h in out.hidden_states[:layers]]
            kept.append((batch, torch.stack([row.float() for row in rows], dim=1).cpu()))
    finally:
        for hook in hooks:
            hook.remove()
    return in_prompt_order(kept)


def mean_difference(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """mean(first) - mean(second) over prompts: one direction per layer and position."""
    return first.mean(0) - second.mean(0)


def orthogonalised(direction: torch.Tensor, against: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``direction`` less ``strength`` times its component along ``against`` (over the last axis)."""
    unit = against / against.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return direction - strength * (direction * unit).sum(-1, keepdim=True) * unit


def probe_accuracy(first: torch.Tensor, second: torch.Tensor, seed: int = 0, held_out: float = 0.25) -> tuple[int, int]:
    """(correct, total) on the held-out prompts of a logistic regression telling ``first`` from
    ``second`` (rows: prompts)."""
    features = torch.cat([first, second]).numpy()
    labels = [1] * len(first) + [0] * len(second)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=held_out, random_state=seed, stratify=labels
    )
    probe = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    return int((probe.predict(test_x) == test_y).sum()), len(test_y)


def residual_writers(model: PreTrainedModel, embedding: str = "edit") -> list[str]:
    """The weights that write into the residual stream; a model without them fails in one line.
    ``embedding``: edit (keep the input embedding), skip, or auto (skip it when the output layer
    shares it: an edit of a tied embedding would change every logit too)."""
    names = [name for name, _ in model.named_parameters() if name.endswith(WRITER_SUFFIXES)]
    if not any(name.endswith("embed_tokens.weight") for name in names) or len(names) < 2:
        raise ModelError(
            f"{type(model).__name__} has no Llama/Qwen2/Mistral/Gemma-style residual writers "
            f"({', '.join(WRITER_SUFFIXES)}).",
            "directional edits support those families",
        )
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    if embedding == "skip" or (embedding == "auto" and tied):
        names = [name for name in names if not name.endswith("embed_tokens.weight")]
    return names


def projection_factors(
    weight: Callable[[str], torch.Tensor], names: list[str], edits: list[tuple[torch.Tensor, float]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each writer's edit as low-rank factors (a [rank, rows], b [rank, columns]), one rank per edit,
    that scale what the writer writes along the edit's direction d by (1 + c): c d (d^T W) for a
    linear layer ([hidden, in]) and c (E d) d^T for the embedding ([vocab, hidden]). c = -1 removes
    the direction (ablation), c > 0 amplifies it."""
    factors = {}
    for name in names:
        base = weight(name).float()
        rows, columns = [], []
        for direction, coefficient in edits:
            unit = (direction / direction.norm().clamp_min(1e-12)).float()
            if name.endswith("embed_tokens.weight"):
                rows.append(coefficient * (base @ unit))
                columns.append(unit)
            else:
                rows.append(coefficient * unit)
                columns.append(unit @ base)
        factors[name] = (torch.stack(rows), torch.stack(columns))
    return factors


def low_rank_delta(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """sum_k outer(rows[k], columns[k]) in float32, rank by rank: elementwise products and sums in a
    fixed order, so every machine computes the same bits (a patch file applies them exactly)."""
    delta = torch.zeros(rows.shape[1], columns.shape[1], dtype=torch.float32)
    for row, column in zip(rows.float(), columns.float(), strict=True):
        delta += torch.outer(row, column)
    return delta


def projection_deltas(
    weight: Callable[[str], torch.Tensor], names: list[str], edits: list[tuple[torch.Tensor, float]]
) -> dict[str, torch.Tensor]:
    """The dense float32 deltas of ``projection_factors``; the edits' deltas add."""
    return {name: low_rank_delta(*pair) for name, pair in projection_factors(weight, names, edits).items()}


def ablation_deltas(weights: Mapping[str, torch.Tensor], direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Deltas that remove ``direction`` from what each writer writes: W' = (I - d d^T) W."""
    return projection_deltas(weights.__getitem__, list(weights), [(direction, -1.0)])


def check_position(position: int, positions: int) -> None:
    """A post-instruction position the chat template has (``positions`` tokens follow the prompt), or
    a one-line error."""
    if -position > positions:
        raise ConfigError(
            f"directional.position {position}: the chat template puts {positions} tokens after the prompt.",
            f"choose a position from -{positions} to -1",
        )


def configured_edits(
    directions: Mapping[str, torch.Tensor], settings: DirectionalConfig
) -> list[tuple[torch.Tensor, float]]:
    """The (direction, coefficient) pairs the settings ask for, from ``refusal`` and
    ``false_refusal`` directions of shape [layer, position, hidden]; a layer or position the
    backbone does not have fails in one line."""
    layers, positions = directions["refusal"].shape[:2]
    check_position(settings.position, positions)
    edits = []
    for knob, scale in (("ablate_layer", settings.ablate_scale), ("add_layer", settings.add_scale)):
        layer = getattr(settings, knob)
        if scale and layer >= layers:
            raise ConfigError(
                f"directional.{knob} {layer}: the backbone has {layers} layers.",
                f"choose a layer from 0 to {layers - 1}",
            )
    at = settings.position
    if settings.ablate_scale:
        refusal = directions["refusal"][settings.ablate_layer, at]
        false_refusal = directions["false_refusal"][settings.ablate_layer, at]
        edits.append((orthogonalised(false_refusal, refusal, settings.strength), -settings.ablate_scale))
    if settings.add_scale:
        edits.append((directions["refusal"][settings.add_layer, at], settings.add_scale))
    return edits


def edit_counts(deltas: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """A merge's counts for an edit applied alone: entries of the edited tensors and how many change."""
    entries = sum(delta.numel() for delta in deltas.values())
    changed = sum(int(torch.count_nonzero(delta)) for delta in deltas.values())
    return {"entries": entries, "changed": changed, "changed_fraction": changed / max(entries, 1),
            "edited_tensors": len(deltas)}  # fmt: skip
