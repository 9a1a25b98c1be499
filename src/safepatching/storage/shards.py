"""Streaming safetensors I/O: read a model folder one tensor at a time, write shards as they fill.

The reader parses the safetensors header itself and reads each tensor with plain file reads (no
memory map), so a pass over a model holds one tensor at a time. The writer plans shards from
names, dtypes and shapes up front, writes each shard's header first and then the tensors in
order, so it too holds one tensor at a time. Output follows the Hugging Face layout
(``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` plus an index), inside a staging
folder that replaces the target only when everything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from safepatching.config.settings import cache_dir
from safepatching.errors import ModelError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
MAX_HEADER_BYTES = 100 * 1024 * 1024
SETTINGS_FILE = "safepatching.json"  # provenance a safepatching merge writes beside the weights


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor locations and metadata of one safetensors file, validated against the file size."""
    path = Path(path)
    problem_fix = "re-download or regenerate the file"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path} is truncated (no safetensors header).", problem_fix)
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelError(f"{path} is truncated or not a safetensors file (bad header length).", problem_fix)
            header = json.loads(handle.read(length).decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist.", "check the path") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a directory, not a safetensors file.", "check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path} is corrupted (its safetensors header is not JSON).", problem_fix) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is corrupted (unexpected safetensors header).", problem_fix)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path} is corrupted (bad entry for tensor {name}).", problem_fix) from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise ModelError(f"{path} is corrupted (tensor {name} has the wrong byte size).", problem_fix)
        if data_start + end > size:
            raise ModelError(f"{path} is truncated (tensor {name} runs past the end of the file).", problem_fix)
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return tensors, metadata


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory with a plain file read."""
    buffer = bytearray(info.nbytes)
    with info.file.open("rb") as handle:
        handle.seek(info.start)
        if handle.readinto(buffer) != info.nbytes:
            raise ModelError(f"{info.file} is truncated (tensor {info.name}).", "re-download or regenerate the file")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


def tensor_digest(tensor: torch.Tensor) -> str:
    """Content hash of a tensor's bytes (dtype and shape are recorded separately)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    return hashlib.sha256(data).hexdigest()  # SHA-NI makes this faster than blake2b on current CPUs


class LazyTensors(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping that reads a tensor only when it is asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_tensor(self.infos[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def tensor_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes without reading lazy tensors."""
    if isinstance(tensors, LazyTensors):
        return {name: info.shape for name, info in tensors.infos.items()}
    return {name: tuple(value.shape) for name, value in tensors.items()}


class WeightFolder:
    """The safetensors weights of a model folder, readable one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError(f"model folder {self.folder} does not exist.", "check the path")
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise ModelError(f"{index} is corrupted.", "re-download or regenerate the model folder") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(
                f"{self.folder} has no safetensors weights.",
                "convert the model to safetensors (pickle is not streamed)",
            )
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(read_header(self.folder / file)[0])

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    # -- remembered content hashes: hashing a 2.5 GB model takes seconds; a repeat apply skips it --------
    def _file_states(self) -> dict[str, list[int]]:
        """Each weight file's size, modification time (ns) and inode: what a rewrite would change."""
        states = {}
        for file in sorted({info.file for info in self.tensors.values()}):
            stat = file.stat()
            states[file.name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        return states

    def _digest_file(self) -> Path:
        key = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:24]
        return cache_dir() / "digests" / f"{key}.json"

    def remembered_digests(self) -> dict[str, Any] | None:
        """The per-tensor content hashes recorded for these files, if no file changed since (size,
        mtime and inode, as git's index trusts them); None otherwise."""
        path = self._digest_file()
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("folder") != str(self.folder.resolve()) or record.get("files") != self._file_states():
            return None
        return record["digests"] if set(record["digests"]) == set(self.tensors) else None

    def remember_digests(self, digests: Mapping[str, Any]) -> None:
        """Record the content hashes of every tensor (best effort: a cache that cannot be written is skipped)."""
        record = {"folder": str(self.folder.resolve()), "files": self._file_states(), "digests": dict(digests)}
        path = self._digest_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".tmp-{os.getpid()}")
            temporary.write_text(json.dumps(record), encoding="utf-8")
            temporary.replace(path)
        except OSError:
            return

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def read_ahead(
    folder: WeightFolder, names: list[str], prepare: Callable[[torch.Tensor], Any]
) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Yield (name, tensor, prepare(tensor)) in order; the next tensor is read and prepared in a
    background thread while the caller works on the current one (file I/O and hashing release the
    GIL), so at most two tensors are in memory."""

    def job(name: str) -> tuple[str, torch.Tensor, Any]:
        value = folder.read(name)
        return name, value, prepare(value)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(job, names[0]) if names else None
        for position in range(len(names)):
            current = pending.result()
            pending = pool.submit(job, names[position + 1]) if position + 1 < len(names) else None
            yield current


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy in-order packing; a tensor larger than the shard size gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if shards[-1] and filled + tensor.nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += tensor.nbytes
    return shards


def _shard_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def write_buffer(handle: BinaryIO, buffer: memoryview) -> None:
    """The single place tensor bytes reach the disk (tests simulate a full disk here)."""
    handle.write(buffer)


def write_shards(
    directory: Path,
    tensors: list[PlannedTensor],
    produce: Callable[[PlannedTensor], torch.Tensor],
    shard_bytes: int,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``tensors`` (values from ``produce``, called once each in order) as HF safetensors shards.

    A tensor is written by a background thread while the next one is produced (the write call
    releases the GIL), so disk writes overlap reading and patching; one write is in flight at most."""
    shards = plan_shards(tensors, shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    written = []
    with ThreadPoolExecutor(max_workers=1) as writer:
        for file_name, shard in zip(names, shards, strict=True):
            path = Path(directory) / file_name
            header = _shard_header(shard, metadata)
            with path.open("wb") as handle:
                handle.write(struct.pack("<Q", len(header)))
                handle.write(header)
                in_flight: tuple[Future, torch.Tensor] | None = None  # the tensor stays alive until written
                try:
                    for planned in shard:
                        value = produce(planned)
                        if value.dtype != planned.dtype or tuple(value.shape) != planned.shape:
                            raise ValueError(f"produced {planned.name} with the wrong dtype or shape")
                        if in_flight is not None:
                            in_flight[0].result()
                            in_flight = None
                        if value.numel():
                            value = value.contiguous()
                            data = value.reshape(-1).view(torch.uint8).numpy().data
                            in_flight = (writer.submit(write_buffer, handle, data), value)
                        if progress:
                            progress(planned.nbytes)
                finally:  # the file is not closed under a write still running
                    if in_flight is not None:
                        in_flight[0].exception()
                if in_flight is not None:
                    in_flight[0].result()
            written.append(path)
    if len(shards) > 1:
        weight_map = {t.name: file_name for file_name, shard in zip(names, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return written


def copy_model_files(source: Path, target: Path, skip: Iterable[str] = ("README.md",)) -> None:
    """Copy the non-weight files of a model folder (config, tokenizer, chat template, ...)."""
    skipped = set(skip) | {INDEX_FILE}
    for path in Path(source).iterdir():
        if path.is_file() and path.name not in skipped and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, Path(target) / path.name)
