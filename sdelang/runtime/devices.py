"""Checking a device name before any work: a machine without the device gets a plain message, not a
stack trace from deep inside torch."""
from __future__ import annotations

import torch

from ..errors import EnvironmentProblem


def check_device(name: str) -> torch.device:
    """The torch.device for `name` ('cpu', 'cuda', 'cuda:1', 'mps', ...), or EnvironmentProblem saying
    what this machine has instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise EnvironmentProblem(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"no CUDA device here (asked for {name!r}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise EnvironmentProblem(f"no device {name!r}: this machine has {count} CUDA device"
                                     f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise EnvironmentProblem(f"no MPS device here (asked for {name!r}); use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise EnvironmentProblem(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device
