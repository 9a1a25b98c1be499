"""What the device a model sits on offers: its kind, name and memory (free and total).

The derivation profile (``method.device_profile``) decides from this; tests hand in a made-up
``DeviceMemory`` to exercise the CUDA choices on a CPU machine.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import psutil
import torch

from safepatching.models.precision import compute_device, cpuinfo


@dataclass(frozen=True)
class DeviceMemory:
    kind: str  # "cpu" or "cuda"
    name: str
    free_bytes: int
    total_bytes: int

    def record(self) -> dict:
        """What a result header keeps of the device (memory in GiB)."""
        gib = 1 << 30
        return {"kind": self.kind, "name": self.name, "free_gib": round(self.free_bytes / gib, 1),
                "total_gib": round(self.total_bytes / gib, 1)}  # fmt: skip


def device_memory(device: torch.device | str | None = None) -> DeviceMemory:
    """The memory of ``device`` (default: where models compute, a CUDA device when one is present)."""
    device = torch.device(device or compute_device())
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory("cuda", torch.cuda.get_device_name(device), free, total)
    memory = psutil.virtual_memory()
    return DeviceMemory("cpu", cpuinfo("model name") or platform.processor() or "cpu", memory.available, memory.total)
