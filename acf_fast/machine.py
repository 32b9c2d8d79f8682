"""Which device a job runs on (``resolve_device``) and what machine a result came
from (``machine_record``, named in every results file we write)."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_record(device) -> dict:
    """Node, CPU, core count, torch version and GPU name (None on CPU) of a run on ``device``."""
    import torch

    device = torch.device(device)
    return {"node": platform.node(), "processor": cpu_model(), "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def resolve_device(name=None):
    """``"auto"`` / None -> cuda when present, else cpu; any other name as torch reads it.

    Raises ValueError naming the device when CUDA is asked for but absent, before any
    work starts (rather than failing later inside the first kernel launch).
    """
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={name!r} is not a device name (cpu, cuda, cuda:N or auto): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked but no CUDA device is available")
    return dev
