"""The directional stage: the backbone's refusal and false-refusal directions on the configured
prompt sets and, for align, its per-sublayer answer and benign probes (each computed once and
cached), and the edit deltas each candidate's settings ask for.

Directions are always taken on the weights the host starts from (the backbone, or it after earlier
continual rounds), never on a candidate's merged model: the edit and the paper's patches then add as
independent terms whose scales a study searches separately, and a trial costs no activation pass.
With the small patch scales the studies choose (KL <= 0.05), the merged model's directions stay
close to the backbone's (docs/method.md, "Directional patches").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safepatching.config.directional import DirectionSets
from safepatching.config.settings import PipelineConfig
from safepatching.data.overlap import assert_disjoint, drop_overlap
from safepatching.data.sources import Example, load_examples
from safepatching.errors import DataError
from safepatching.evaluation.generation import HFGenerator
from safepatching.evaluation.judges.registry import Judges
from safepatching.evaluation.judges.rules import Judge
from safepatching.method.alignment import (
    alignment_directions,
    alignment_factors,
    chosen_sublayers,
)
from safepatching.method.dense import patched
from safepatching.method.directions import (
    activations,
    check_position,
    configured_edits,
    low_rank_delta,
    mean_difference,
    post_instruction_length,
    projection_factors,
    residual_writers,
    sublayer_names,
)
from safepatching.storage.cache import cached, fingerprint, recorded_wall_seconds
from safepatching.storage.files import load_tensors, save_tensors, write_json

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # per writer: rows [rank, out], columns [rank, in]
WeightOf = Callable[[str], torch.Tensor]  # a float32 weight by name
MIN_PROMPTS = 16  # fewer leave a direction (and a probe's held-out quarter) to noise
SETS = ("harmful", "harmless", "benign")


def direction_prompts(
    sets: DirectionSets, data_dir: Path | None, held_out: Mapping[str, list[Example]]
) -> dict[str, list[str]]:
    """The three sets' prompts, refused when one holds a held-out (evaluated or validation) prompt
    or has too few."""
    prompts = {}
    for name in SETS:
        spec = getattr(sets, name)
        examples = load_examples(spec, data_dir)
        if sets.drop_held_out:
            examples = drop_overlap(examples, dict(held_out), f"directions {name} prompts")
        assert_disjoint(examples, dict(held_out), against=f"directions {name} set")
        if len(examples) < MIN_PROMPTS:
            raise DataError(
                f"the {name} set ({spec.source} {spec.split}) has {len(examples)} prompts; directions need {MIN_PROMPTS}.",
                f"give {name} a larger split",
            )
        prompts[name] = [e.prompt for e in examples]
    return prompts


def refusals(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], judge: Judge, max_new_tokens: int,
    batch_size: int,
) -> list[bool]:  # fmt: skip
    """Whether the model refuses each prompt, by ``judge`` on a greedy reply of ``max_new_tokens``."""
    replies = HFGenerator(model, tokenizer, batch_size, progress=False).generate(prompts, max_new_tokens)
    return [judge(prompt, reply).refusal for prompt, reply in zip(prompts, replies, strict=True)]


def refused_only(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sets: DirectionSets, prompts: list[str], judge: Judge,
    batch_size: int,
) -> list[str]:  # fmt: skip
    """The benign prompts the model refuses (Surgical's rule); too few fail in one line."""
    refused = refusals(model, tokenizer, prompts, judge, sets.refusal_max_new_tokens, batch_size)
    kept = [prompt for prompt, flag in zip(prompts, refused, strict=True) if flag]
    if len(kept) < MIN_PROMPTS:
        raise DataError(
            f"the backbone refuses {len(kept)} of the {len(prompts)} benign direction prompts; directions need "
            f"{MIN_PROMPTS}.",
            "set directional.sets.benign_refused_only: false, or give benign a larger or harder split",
        )
    return kept


def set_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, list[str]],
    batch_size: int,
    compute_dtype: str,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Each set's activations [prompt, layer, position, hidden] at the post-instruction positions."""
    positions = post_instruction_length(tokenizer)
    return {
        name: activations(model, tokenizer, prompts[name], positions, batch_size, compute_dtype)
        for name in tqdm(prompts, desc="activations", disable=not progress)
    }


def directions_of(activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """r = mean(harmful) - mean(harmless) and v = mean(benign) - mean(harmless), per layer and position."""
    return {
        "refusal": mean_difference(activations["harmful"], activations["harmless"]).contiguous(),
        "false_refusal": mean_difference(activations["benign"], activations["harmless"]).contiguous(),
    }


def stacked(first: Factors, second: Factors) -> Factors:
    """Two edits' low-rank factors as one: a writer both change stores their ranks side by side."""
    both = dict(first)
    for name, (rows, columns) in second.items():
        if name in both:
            rows, columns = torch.cat([both[name][0], rows]), torch.cat([both[name][1], columns])
        both[name] = (rows, columns)
    return both


class DirectionalEdits:
    """The directions of one host's weights under ``directory`` (one cached stage per distinct set
    of prompts), and the edits built from them. ``held_out`` are the prompts no direction set may
    hold; the config's own sets are checked when this is made, before any model loads."""

    def __init__(
        self,
        config: PipelineConfig,
        judges: Judges,
        directory: Path,
        held_out: Mapping[str, list[Example]],
        base_state: str | None = None,
        progress: bool = True,
    ):
        self.config, self.judges, self.directory = config, judges, Path(directory)
        self.compute_dtype = judges.loading.compute_dtype
        self.held_out, self.base_state, self.progress = held_out, base_state, progress
        self.meter: dict[str, dict[str, float]] = {}
        self._prompts: dict[str, tuple[dict[str, list[str]], DirectionSets]] = {}
        self._alignment_keys: set[str] = set()
        if config.directional.active:
            self.prompts(config.directional.sets)

    def prompts(self, sets: DirectionSets) -> dict[str, list[str]]:
        """The sets' prompts, read and checked once (a copy: the benign set may be filtered)."""
        key = fingerprint(sets)
        if key not in self._prompts:
            self._prompts[key] = (direction_prompts(sets, self.config.data_dir, self.held_out), sets)
        return dict(self._prompts[key][0])

    def key(self, prompts: dict[str, list[str]], sets: DirectionSets) -> str:
        """What the directions depend on: the weights, the compute dtype, the prompts and, when the
        benign set is filtered, who judges refusal and how long a reply it reads."""
        parts = [self.config.model, self.compute_dtype, prompts]
        if sets.benign_refused_only:
            parts += ["refused_only", self.config.eval.refusal_judge, self.config.eval.judge_model,
                      sets.refusal_max_new_tokens]  # fmt: skip
        return self.host_key(*parts)

    def host_key(self, *parts) -> str:
        """A stage key of ``parts`` and, after earlier continual rounds, the host's weights."""
        return fingerprint(*parts, *([self.base_state] if self.base_state else []))

    def directions(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: PipelineConfig
    ) -> dict[str, torch.Tensor]:
        """The directions of the settings' sets on ``model`` (the host's weights in the compute dtype)."""
        sets = settings.directional.sets
        prompts = self.prompts(sets)
        key = self.key(prompts, sets)
        directory = self.directory / key[:12]
        path = directory / "directions.safetensors"

        def produce() -> dict[str, torch.Tensor]:
            if sets.benign_refused_only:
                benign = refused_only(model, tokenizer, sets, prompts["benign"], self.judges.refusal,
                                      self.config.eval.batch_size)  # fmt: skip
                write_json(directory / "benign_refused.json", benign)
                prompts["benign"] = benign
            acts = set_activations(
                model, tokenizer, prompts, settings.directional.batch_size, self.compute_dtype, self.progress
            )
            found = directions_of(acts)
            save_tensors(path, found)
            return found

        return cached(directory, key, produce, lambda: load_tensors(path), self.meter, "directions")

    def alignment_key(self, prompts: dict[str, list[str]], settings: PipelineConfig, iteration: int = 0) -> str:
        """What the alignment probes depend on: the weights, the compute dtype, all three sets' prompts,
        who judges the replies that label them answered or refused, the position probed and, after the
        first round, the rewrite the earlier rounds made (its scale, sublayer count and rounds)."""
        edit = settings.directional
        parts = ["align", self.config.model, self.compute_dtype, prompts, self.config.eval.refusal_judge,
                 self.config.eval.judge_model, edit.sets.refusal_max_new_tokens, edit.position]  # fmt: skip
        if iteration:
            parts.append(["rounds", iteration, edit.align_scale, edit.align_sublayers])
        return self.host_key(*parts)

    def alignment(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: PipelineConfig, iteration: int = 0
    ) -> dict[str, torch.Tensor]:
        """LLM-VA's probes of every attention and MLP output on ``model`` (as ``iteration`` earlier
        rounds left it): the harmful set against the harmless and benign ones, and the model's answers
        against its refusals of all three."""
        sets, position = settings.directional.sets, settings.directional.position
        prompts = self.prompts(sets)
        key = self.alignment_key(prompts, settings, iteration)
        self._alignment_keys.add(key)
        directory = self.directory / key[:12]
        path = directory / "alignment.safetensors"

        def produce() -> dict[str, torch.Tensor]:
            positions = post_instruction_length(tokenizer)
            check_position(position, positions)  # before the replies, the stage's long part
            everything = [prompt for name in SETS for prompt in prompts[name]]
            refused = refusals(model, tokenizer, everything, self.judges.refusal, sets.refusal_max_new_tokens,
                               self.config.eval.batch_size)  # fmt: skip
            answered = torch.tensor([not flag for flag in refused])
            write_json(directory / "answered.json", dict(zip(everything, answered.tolist(), strict=True)))
            if min(int(answered.sum()), int((~answered).sum())) < MIN_PROMPTS:
                raise DataError(
                    f"the backbone answers {int(answered.sum())} of the {len(everything)} direction prompts; align's "
                    f"answered/refused probe needs {MIN_PROMPTS} of each.",
                    "give the direction sets more prompts the backbone refuses (harmful) and answers (harmless)",
                )
            benign = torch.tensor([name != "harmful" for name in SETS for _ in prompts[name]])
            acts = activations(model, tokenizer, everything, -position, settings.directional.batch_size,
                               self.compute_dtype, "sublayers")  # fmt: skip
            found = alignment_directions(acts[:, :, 0], benign, answered)
            save_tensors(path, found)
            return found

        return cached(directory, key, produce, lambda: load_tensors(path), self.meter, "alignment")

    def factors(self, settings: PipelineConfig, model: PreTrainedModel, tokenizer, weight: WeightOf) -> Factors:
        """The settings' edits as low-rank factors per writer (none when they are off), from the
        float32 weights ``weight`` gives by name; a writer two edits change stacks their ranks."""
        edit = settings.directional
        factors: Factors = {}
        if edit.ablate_scale or edit.add_scale:
            projections = configured_edits(self.directions(model, tokenizer, settings), edit)
            factors = projection_factors(weight, residual_writers(model, edit.embedding), projections)
        if edit.align_scale:
            factors = stacked(factors, self.aligned(settings, model, tokenizer, weight))
        return factors

    def aligned(self, settings: PipelineConfig, model: PreTrainedModel, tokenizer, weight: WeightOf) -> Factors:
        """align's rounds: each probes ``model`` patched with the earlier rounds' rewrites (restored
        from ``weight`` afterwards) and rewrites the weights they left."""
        edit = settings.directional
        names = [f"{name}.weight" for name in sublayer_names(model)]
        factors: Factors = {}
        for iteration in range(edit.align_iterations):
            deltas = {name: low_rank_delta(*pair) for name, pair in factors.items()}
            with patched(model, deltas, weight):
                found = self.alignment(model, tokenizer, settings, iteration)

            def edited(name: str, deltas=deltas) -> torch.Tensor:
                return weight(name).float() + deltas[name] if name in deltas else weight(name).float()

            chosen = chosen_sublayers(found, min(edit.align_sublayers, len(names)))
            factors = stacked(factors, alignment_factors(edited, {i: names[i] for i in chosen}, found, edit.align_scale))
        return factors

    def deltas(self, settings: PipelineConfig, model, tokenizer, weight) -> dict[str, torch.Tensor]:
        """The dense float32 deltas of ``factors``."""
        return {name: low_rank_delta(*pair) for name, pair in self.factors(settings, model, tokenizer, weight).items()}

    def stage_keys(self, settings: PipelineConfig) -> list[str]:
        """The keys of the stages the settings' edits read."""
        edit, sets = settings.directional, settings.directional.sets
        prompts = self.prompts(sets)
        rounds = edit.align_iterations if edit.align_scale else 0
        return [*([self.key(prompts, sets)] if edit.ablate_scale or edit.add_scale else []),
                *(self.alignment_key(prompts, settings, iteration) for iteration in range(rounds))]  # fmt: skip

    def seconds(self, settings: PipelineConfig) -> float:
        """Wall time the settings' directions and probes took when they were computed (0: not yet)."""
        return stages_wall_seconds(self.directory, self.stage_keys(settings))

    def computed_seconds(self) -> float:
        """Wall time of every direction and probe stage computed under this host's directory."""
        keys = {self.key(prompts, sets) for prompts, sets in self._prompts.values()} | self._alignment_keys
        return stages_wall_seconds(self.directory, keys)


def stages_wall_seconds(directory: Path, keys: Iterable[str]) -> float:
    """The summed wall time the stages of ``keys`` under ``directory`` recorded (0 for one not yet run)."""
    return sum(recorded_wall_seconds(directory / key[:12]) for key in keys)

