"""GPUs: which ones this host has, and which each worker process gets.

Used by the supervisor only, never by workers: a worker sees just its own GPUs through
``CUDA_VISIBLE_DEVICES``, set before its interpreter starts, so CUDA inside it numbers them
from 0 and cannot touch another worker's.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

from .exceptions import ServiceDefinitionError


class DeviceError(ServiceDefinitionError):
    """The GPUs asked for cannot be given: start-up stops with this message."""


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def discover(option: str | None = None, env: Mapping[str, str] | None = None) -> tuple[list[str], str]:
    """The GPU ids to use and where they came from: ``--gpus``, else CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    env = os.environ if env is None else env
    if option is not None:
        return _ids(option), "--gpus"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # "" or "-1" means none, as CUDA itself reads it.
        ids = [i for i in _ids(visible) if i != "-1"]
        return ids, "CUDA_VISIBLE_DEVICES"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi (not installed)"
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return [], "nvidia-smi (failed)"
    return re.findall(r"^GPU (\d+):", listing, flags=re.M), "nvidia-smi -L"


def assign(per_worker: float, gpus: list[str], workers: int | None, source: str = "--gpus") -> list[list[str]]:
    """The GPU ids of each worker; ``workers`` None means as many as the GPUs allow.

    ``per_worker`` is a whole number of GPUs, or a fraction below 1 (0.5: two workers share
    one GPU). Raises ``DeviceError`` naming the numbers when the request cannot be met.
    """
    if per_worker <= 0:
        raise DeviceError(f"resources={{'gpu': {per_worker}}} must be a positive number of GPUs per worker.")
    if not gpus:
        raise DeviceError(
            f"The service asks for {per_worker:g} GPU(s) per worker, but no GPU was found (from {source}). "
            "Name the GPUs with --gpus 0,1 (or CUDA_VISIBLE_DEVICES), or run it on a host with GPUs."
        )
    if per_worker >= 1:
        if per_worker != int(per_worker):
            raise DeviceError(
                f"resources={{'gpu': {per_worker:g}}}: ask for a whole number of GPUs per worker, "
                "or a fraction below 1 to share one GPU between workers."
            )
        n = int(per_worker)
        capacity = len(gpus) // n
        plan = [gpus[i * n : (i + 1) * n] for i in range(capacity)]
    else:
        share = math.floor(1 / per_worker + 1e-9)  # workers per GPU
        capacity = len(gpus) * share
        plan = [[gpus[i // share]] for i in range(capacity)]
    if capacity == 0 or (workers is not None and workers > capacity):
        wanted = workers if workers is not None else 1
        raise DeviceError(
            f"{wanted} worker(s) x {per_worker:g} GPU(s) each need {wanted * per_worker:g} GPU(s), but "
            f"{len(gpus)} are available ({', '.join(gpus)}, from {source}). Use fewer --workers, or more --gpus."
        )
    return plan if workers is None else plan[:workers]


def worker_env(gpus: list[str]) -> dict[str, str]:
    """What a worker with these GPUs gets in its environment."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
