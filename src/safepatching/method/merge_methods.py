"""Controllable patching: pure per-tensor merge functions behind a small registry.

A merge method turns one tensor's patches (and, if it needs them, importance regions) into the
delta added to the backbone. Random retention draws from a generator seeded by the run seed, the
patch label and the tensor name, so results do not depend on the order tensors are visited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from safepatching.config.settings import MergeConfig
from safepatching.method.regions import difference_sets, top_threshold


@dataclass(frozen=True)
class TensorPatches:
    """Everything a merge method may use for one tensor."""

    name: str
    safety: torch.Tensor
    over_safety: torch.Tensor
    safety_region: torch.Tensor | None = None
    over_safety_region: torch.Tensor | None = None


@dataclass(frozen=True)
class MergeMethod:
    function: Callable[[TensorPatches, MergeConfig, int], torch.Tensor]
    needs_importance: bool
    description: str
    uses_retention: bool = True  # whether the seed (random retention) changes the result


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(name: str, needs_importance: bool, description: str, uses_retention: bool = True):
    def decorator(function: Callable[[TensorPatches, MergeConfig, int], torch.Tensor]):
        MERGE_METHODS[name] = MergeMethod(function, needs_importance, description, uses_retention)
        return function

    return decorator


def tensor_seed(seed: int, label: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{label}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def retain(delta: torch.Tensor, rate: float, rescale: str, seed: int) -> torch.Tensor:
    """Keep each entry with probability ``rate``; with rescale 'inverse' kept entries are divided by it."""
    if rate >= 1.0:
        return delta
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) < rate
    kept = delta * keep.to(delta.device)
    return kept / rate if rescale == "inverse" else kept


def retained_pair(patches: TensorPatches, settings: MergeConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        retain(patches.safety, settings.retention, settings.rescale, tensor_seed(seed, "safety", patches.name)),
        retain(
            patches.over_safety, settings.retention, settings.rescale, tensor_seed(seed, "over_safety", patches.name)
        ),
    )


@register("safepatching", True, "alpha*(M_s*P_s) + beta*(M_o*P_o) on the difference sets of the SNIP regions")
def safepatching_merge(patches: TensorPatches, settings: MergeConfig, seed: int) -> torch.Tensor:
    safety, over_safety = retained_pair(patches, settings, seed)
    safety_only, over_only = difference_sets(patches.safety_region, patches.over_safety_region)
    return settings.alpha * safety * safety_only + settings.beta * over_safety * over_only


@register("task_arithmetic", False, "alpha*P_s + beta*P_o over every entry (after random retention)")
def task_arithmetic_merge(patches: TensorPatches, settings: MergeConfig, seed: int) -> torch.Tensor:
    safety, over_safety = retained_pair(patches, settings, seed)
    return settings.alpha * safety + settings.beta * over_safety


@register(
    "safepatching_intersection",
    True,
    "ablation: alpha*P_s + beta*P_o on the intersection of the SNIP regions instead of their differences",
)
def intersection_merge(patches: TensorPatches, settings: MergeConfig, seed: int) -> torch.Tensor:
    safety, over_safety = retained_pair(patches, settings, seed)
    both = patches.safety_region & patches.over_safety_region
    return (settings.alpha * safety + settings.beta * over_safety) * both


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (TIES's trim step)."""
    keep = max(1, round(density * delta.numel()))
    if keep >= delta.numel():
        return delta
    return delta * (delta.abs() >= top_threshold(delta.abs(), keep))


@register(
    "ties",
    False,
    "TIES: trim each weighted patch to its top-density magnitudes, elect signs, disjoint mean",
    uses_retention=False,
)
def ties_merge(patches: TensorPatches, settings: MergeConfig, seed: int) -> torch.Tensor:
    weighted = torch.stack(
        [
            settings.alpha * trim_to_density(patches.safety, settings.density),
            settings.beta * trim_to_density(patches.over_safety, settings.density),
        ]
    )
    elected = torch.sign(weighted.sum(0))
    agrees = (torch.sign(weighted) == elected) & (weighted != 0)
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)
