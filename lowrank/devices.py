"""Where the stages run: the GPU when there is one, unless `LOWRANK_DEVICE` says otherwise.

An environment setting, not a param: the device changes how fast a stage
runs, not what it computes (up to floating-point order), so it must not
invalidate DVC's or Prefect's caches. Latency is always measured on the CPU,
where the compressed models are meant to serve.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

DEVICE_ENV = "LOWRANK_DEVICE"


def default_device() -> torch.device:
    """`LOWRANK_DEVICE` (cpu, cuda, cuda:1, ...) or, when unset or `auto`, cuda if available."""
    name = os.environ.get(DEVICE_ENV, "auto").strip() or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a torch device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_ENV}={name!r}, but torch sees no CUDA device")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of tensors moved to `device`; a no-op on the device they are on."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def place(model: nn.Module) -> nn.Module:
    """The model moved to the default device, for a stage to work on."""
    return model.to(default_device())


def _cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where there is none (not Linux)."""
    from pathlib import Path

    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(cpuinfo: str, key: str) -> str | None:
    """The value of the first `key` line of a cpuinfo text."""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(key)), None)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (latency figures depend on it: BENCHMARKS.md, section 4)."""
    import platform

    return _cpuinfo_field(_cpuinfo(), "model name") or platform.processor() or platform.machine()


# The vector extensions a CPU's GEMM kernels use: two CPUs that /proc/cpuinfo names alike ("AMD EPYC" in a VM)
# differ here, and with them the share of a forward pass that the Linear products take (BENCHMARKS.md, section 4).
GEMM_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "BF16", "amx_tile": "AMX"}


def cpu_features(cpuinfo: str | None = None) -> str:
    """The GEMM-relevant vector extensions in /proc/cpuinfo's flags (or in `cpuinfo`), e.g. "AVX2, AVX-512, VNNI"."""
    flags = _cpuinfo_field(_cpuinfo() if cpuinfo is None else cpuinfo, "flags")
    if flags is None:
        return "unknown"
    present = flags.split()
    return ", ".join(name for flag, name in GEMM_FEATURES.items() if flag in present) or "none of " + ", ".join(GEMM_FEATURES.values())


def runtime_versions() -> dict[str, str]:
    """Where a latency was measured: the CPU model and vector extensions, its cores, and the torch and onnxruntime versions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ort = version("onnxruntime")
    except PackageNotFoundError:
        ort = "not installed"
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cores": str(os.cpu_count()), "torch": torch.__version__, "onnxruntime": ort}

