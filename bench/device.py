"""The device record every benchmark result carries, and energy measurement.

On a GPU (nvidia-ml-py): name, UUID, driver, SM and memory clocks, memory used,
power; the torch device is matched to its NVML handle by UUID because NVML indices
ignore ``CUDA_VISIBLE_DEVICES`` (PLATFORM_FACTS). Without a GPU, ``nvmlInit`` raises
``NVMLError_LibraryNotFound``; we catch any NVMLError and record the CPU model from
/proc/cpuinfo and the thread count instead. Library versions are always recorded.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch

from acf_fast.machine import cpu_model


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as err:  # a broken triton install must not stop a CPU benchmark
        out["triton"] = f"unavailable ({type(err).__name__})"
    try:
        import acf_fast

        out["acf_fast"] = acf_fast.__version__
    except Exception:
        pass
    return out


def cpu_record() -> dict:
    """Fields describing the host CPU (present in every record, GPU or not)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "system": platform.system(),
    }


def _nvml():
    """The pynvml module after a successful ``nvmlInit``, or None (no library, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVMLError_LibraryNotFound on machines without a driver
        return None
    return pynvml


def _as_str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def torch_uuid(index: int) -> Optional[str]:
    """UUID string of torch CUDA device ``index`` ("GPU-xxxxxxxx-…"), or None."""
    try:
        uuid = torch.cuda.get_device_properties(index).uuid
    except (AttributeError, RuntimeError, AssertionError):
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def nvml_handle(pynvml, index: int):
    """NVML handle of the torch device ``index``, matched by UUID; falls back to the index."""
    want = torch_uuid(index)
    if want is not None:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            if _as_str(pynvml.nvmlDeviceGetUUID(h)).lower() == want.lower():
                return h
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _try(fn: Callable, *args):
    try:
        return fn(*args)
    except Exception:  # a field the driver does not support is recorded as None
        return None


def gpu_record(index: int = 0) -> dict:
    """NVML fields of torch CUDA device ``index`` (empty dict when NVML is unavailable)."""
    pynvml = _nvml()
    rec = {"torch_name": torch.cuda.get_device_name(index), "torch_uuid": torch_uuid(index)}
    if pynvml is None:
        rec["nvml"] = "unavailable"
        return rec
    h = nvml_handle(pynvml, index)
    clk = pynvml
    mem = _try(pynvml.nvmlDeviceGetMemoryInfo, h)
    power_mw = _try(pynvml.nvmlDeviceGetPowerUsage, h)
    limit_mw = _try(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
    rec.update(
        {
            "name": _as_str(_try(pynvml.nvmlDeviceGetName, h)),
            "uuid": _as_str(_try(pynvml.nvmlDeviceGetUUID, h)),
            "driver": _as_str(_try(pynvml.nvmlSystemGetDriverVersion)),
            "cuda_driver": _try(pynvml.nvmlSystemGetCudaDriverVersion_v2) if hasattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2") else None,
            "sm_clock_mhz": _try(pynvml.nvmlDeviceGetClockInfo, h, clk.NVML_CLOCK_SM),
            "sm_clock_max_mhz": _try(pynvml.nvmlDeviceGetMaxClockInfo, h, clk.NVML_CLOCK_SM),
            "mem_clock_mhz": _try(pynvml.nvmlDeviceGetClockInfo, h, clk.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": _try(pynvml.nvmlDeviceGetMaxClockInfo, h, clk.NVML_CLOCK_MEM),
            "memory_used_bytes": None if mem is None else int(mem.used),
            "memory_total_bytes": None if mem is None else int(mem.total),
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
            "temperature_c": _try(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
        }
    )
    rec["uuid_matched"] = rec["torch_uuid"] is not None and (rec["uuid"] or "").lower() == rec["torch_uuid"].lower()
    return rec


def device_record(device: Optional[torch.device] = None) -> dict:
    """Everything needed to tell where a number was measured.

    Returns a JSON-ready dict: ``kind`` ("cuda" or "cpu"), ``name`` (GPU or CPU model),
    ``label`` (a short file-name-safe slug), ``date`` (UTC, ISO 8601), versions, the CPU
    fields, and on a GPU the NVML fields of :func:`gpu_record`.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    rec = {
        "kind": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        **cpu_record(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = gpu_record(index)
        rec["gpu"] = gpu
        rec["name"] = gpu.get("name") or gpu["torch_name"]
    else:
        rec["name"] = rec["cpu_model"]
    rec["label"] = slug(rec["name"])
    return rec


def slug(text: str) -> str:
    """A lower-case, file-name-safe label: "NVIDIA H200" -> "nvidia-h200"."""
    s = re.sub(r"\((?:r|tm)\)", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:48].strip("-") or "device"


class EnergyMeter:
    """Joules spent on a GPU between ``start()`` and ``stop()``.

    Uses ``nvmlDeviceGetTotalEnergyConsumption`` (mJ counter) where the GPU has it;
    otherwise samples ``nvmlDeviceGetPowerUsage`` (a 1 s average on Ampere and newer)
    every ``interval_s`` in a thread and integrates by the trapezoid rule, which is
    only as good as that averaging allows. ``method`` says which was used.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        self.pynvml = _nvml()
        if self.pynvml is None:
            raise RuntimeError("EnergyMeter needs NVML (an NVIDIA GPU and driver)")
        self.handle = nvml_handle(self.pynvml, index)
        self.interval_s = interval_s
        self.method = None
        self._samples = []
        self._thread = None
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), self.pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0))
            self._stop.wait(self.interval_s)

    def start(self) -> "EnergyMeter":
        self._t0 = time.perf_counter()
        try:
            self._e0 = self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.method = "nvmlDeviceGetTotalEnergyConsumption"
        except self.pynvml.NVMLError:
            self.method = "power sampling"
            self._samples = []
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        """Returns {"joules", "seconds", "mean_power_w", "method"}."""
        t1 = time.perf_counter()
        if self.method == "nvmlDeviceGetTotalEnergyConsumption":
            joules = (self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._e0) / 1000.0
        else:
            self._stop.set()
            self._thread.join()
            s = self._samples
            if len(s) >= 2:
                t = np.array([x[0] for x in s])
                p = np.array([x[1] for x in s])
                joules = float(np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(t)))
            else:
                joules = float("nan")
        seconds = t1 - self._t0
        return {"joules": float(joules), "seconds": seconds, "mean_power_w": float(joules) / seconds if seconds > 0 else float("nan"), "method": self.method}
