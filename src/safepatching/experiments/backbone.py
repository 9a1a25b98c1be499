"""The backbone host: the one place that holds the backbone's weights, in whichever dtype a stage needs.

Derivation and importance train a float32 master; generation runs in the compute dtype. One copy
is held: after training it is cast in place, since the stages that train all come before
evaluation. The files' weights are read on demand, so patching restores from them instead of a
copy of every touched tensor. Bench, validation, continual PSA and the pipeline share this host.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import psutil
import torch

from safepatching.config.settings import DeriveConfig, ImportanceConfig, ModelLoading
from safepatching.evaluation.generation import HFGenerator
from safepatching.method.dense import holds_base
from safepatching.method.memory import ModelSize, check_training_fits, is_target
from safepatching.method.objectives import autocast
from safepatching.models.loading import check_model_source, load_model, weights_folder
from safepatching.models.precision import DTYPES, cast_weights, hold_output_layer_in
from safepatching.storage.cache import stage_meter
from safepatching.storage.files import read_json
from safepatching.storage.shards import WeightFolder


class Backbone:
    """``source`` loaded with ``loading`` (already resolved), or a given in-memory (model, tokenizer),
    e.g. a study's float32 master or continual PSA's working model, used as it is."""

    def __init__(
        self,
        source: str,
        loading: ModelLoading,
        target_modules: list[str],
        loaded: tuple[Any, Any] | None = None,
        meter: dict[str, Any] | None = None,
    ):
        self.source, self.loading, self.target_modules = source, loading, target_modules
        self.meter = {} if meter is None else meter
        self.given = loaded is not None
        self._model, self._tokenizer = loaded or (None, None)
        self._weights: WeightFolder | None = None
        self._generating = None
        if not self.given:
            check_model_source(source)  # an unknown name fails here, before any output or work

    @property
    def compute_dtype(self) -> str:
        return self.loading.compute_dtype

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def model(self, training: bool = False):
        """(model, tokenizer) in float32 for ``training`` (derivation, importance), in the compute dtype
        otherwise."""
        dtype = DTYPES["float32" if training else self.compute_dtype]
        if self._model is not None and (self.given or next(self._model.parameters()).dtype == dtype):
            return self._model, self._tokenizer
        if self._model is not None and not training:
            cast_weights(self._model, dtype)
            return self._model, self._tokenizer
        self._model = None  # a float32 copy is loaded afresh rather than widened from rounded weights
        with stage_meter(self.meter, "load_backbone"):
            self._model, self._tokenizer = load_model(self.source, loading=self.loading, training=training)
            if training:
                hold_output_layer_in(self._model, DTYPES[self.compute_dtype], self.target_modules)
        return self._model, self._tokenizer

    def master_host(self) -> Backbone:
        """A host over this backbone's float32 master for callers that change it (a study's trials,
        continual PSA's rounds): restoring from the files is then checked against what it holds."""
        master = self.model(training=True)
        return Backbone(self.source, self.loading, self.target_modules, loaded=master, meter=self.meter)

    def generating_copy(self):
        """The model a study patches and generates with, beside the float32 master that derivation and
        importance train: the master itself when the compute dtype is float32, else one copy in the
        compute dtype."""
        if self._generating is None:
            master, _ = self.model(training=True)
            dtype = DTYPES[self.compute_dtype]
            self._generating = master if dtype == torch.float32 else cast_weights(copy.deepcopy(master), dtype)
        return self._generating

    def generating_base(self):
        """What the generating copy's weights are restored from after a patch: the files while the
        copy is the (untouched) float32 master, else the master's weights (no copy of every patched
        tensor: 5 GB at 1.5B)."""
        master, _ = self.model(training=True)
        if self.generating_copy() is master:
            return self.base_weight
        weights = dict(master.named_parameters())
        return lambda name: weights[name].detach()

    def folder(self) -> Path:
        """The backbone's local safetensors folder; a demo model is fetched and converted on first use."""
        if self._weights is None:
            self._weights = WeightFolder(weights_folder(self.source, loading=self.loading))
        return self._weights.folder

    def base_weight(self, name: str):
        """A backbone weight as stored (float32 for the demo models), read from disk on demand."""
        self.folder()
        return self._weights.read(name)

    def restore_source(self, model, names: list[str]):
        """What patching and derivation read ``model``'s untrained weights back from: the backbone's
        files for a model loaded here, and for a given one (a study's master) when it still holds
        exactly them; else None, and a copy of every touched tensor is taken (5 GB at 1.5B)."""
        return holds_base(model, names, self.base_weight) if self.given else self.base_weight

    def check_training_fits(self, derive: DeriveConfig, importance: ImportanceConfig) -> None:
        """Refuse a derivation this machine cannot hold, from the weight files' headers and config alone."""
        folder = self.folder()
        counts = {name: info.numel for name, info in self._weights.tensors.items()}
        wanted = set(derive.target_modules)
        target = sum(n for name, n in counts.items() if is_target(name, wanted))
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        size = ModelSize.from_config(sum(counts.values()), target, config)
        check_training_fits(self.source, size, derive, importance, psutil.virtual_memory().total)

    def answer(self, model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress: bool, desc: str):
        """Greedy replies of ``model`` to ``prompts`` (over-safety training replies, own replies), under
        autocast: a float32 master (a study's, or one loaded for training) holds its output layer in
        the compute dtype."""
        generator = HFGenerator(model, tokenizer, batch_size, progress, desc)
        with autocast(model, DTYPES[self.compute_dtype]):
            return generator.generate(prompts, max_new_tokens)
