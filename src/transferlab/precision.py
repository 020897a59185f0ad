"""Numeric precision: resolve ``--precision auto`` and build the autocast context and scaler.

auto -> bf16 autocast on CUDA GPUs with bf16 support and on CPUs with AMX or AVX512-BF16
(about 3x fp32 for convolutions on this project's Xeons); fp16 + GradScaler on older GPUs;
fp32 elsewhere.

Usage:
    prec = resolve_precision("auto", torch.device("cpu"))
    with autocast(prec, device):
        loss = model(x)
"""

from __future__ import annotations

import contextlib

import torch

from transferlab.errors import UserError


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX tiles or AVX512-BF16 (bf16 matmul/conv in hardware)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks):
        return True
    try:  # older torch builds lack the probes above; the kernel's CPU flags are the truth
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map auto/fp32/bf16/fp16 to the concrete choice for ``device``; refuse impossible ones."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
