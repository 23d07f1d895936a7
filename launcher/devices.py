"""The accelerators a local rank would see, found without importing torch (the launcher never
does): nvidia-smi in a subprocess, else the NVIDIA driver's /proc entries, else ROCm's
/dev/kfd. Honours CUDA_VISIBLE_DEVICES as torch would (empty or -1: no GPU)."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

# Native bf16 arrived with Ampere (A100: compute capability 8.0).
BF16_MIN_CAPABILITY = 8.0
BF16_DEVICES = "an NVIDIA GPU of compute capability >= 8.0 (A100, H100, L40S, RTX 30xx/40xx) or an AMD MI200/MI300"
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: Optional[float]  # CUDA compute capability; None when unknown


def _nvidia_smi() -> Optional[list[Gpu]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None if "NVIDIA-SMI has failed" not in done.stdout + done.stderr else []
    gpus = []
    for line in done.stdout.splitlines():
        name, _, cap = line.rpartition(",")
        try:
            gpus.append(Gpu(name.strip(), float(cap)))
        except ValueError:  # an old driver without compute_cap
            gpus.append(Gpu(line.strip(), None))
    return gpus


def _visible(gpus: list[Gpu], environ: Mapping[str, str]) -> list[Gpu]:
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return gpus
    if not mask.strip():
        return []
    picked: list[Gpu] = []
    for item in (part.strip() for part in mask.split(",")):
        if not item.lstrip("-").isdigit():
            return gpus[:len(mask.split(","))]  # UUIDs or MIG names: count them
        if int(item) < 0 or int(item) >= len(gpus):
            break  # CUDA stops at the first invalid entry
        picked.append(gpus[int(item)])
    return picked


def local_gpus(environ: Mapping[str, str] = os.environ) -> list[Gpu]:
    """The GPUs a rank started on this machine would use (torch.cuda's view)."""
    found = _nvidia_smi()
    if found is None and NVIDIA_PROC.is_dir():
        found = [Gpu(f"NVIDIA GPU {entry.name}", None) for entry in sorted(NVIDIA_PROC.iterdir())]
    if found is None and Path("/dev/kfd").exists():  # ROCm: torch.cuda drives it too
        found = [Gpu("AMD GPU (ROCm)", None)]
    if environ.get("HIP_VISIBLE_DEVICES") == "":
        return []
    return _visible(found or [], environ)


if __name__ == "__main__":  # `python launcher/devices.py`: what the launcher sees here
    print(local_gpus())
