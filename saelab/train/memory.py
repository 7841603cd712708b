"""Will the SAEs fit? The memory a sweep needs, checked before any SAE is allocated.

Per SAE of a sweep (fp32, P parameters, batch B, d_in D, d_sae F):

    P          = D F (W_dec) + [D F (W_enc), unless tied] + F + D (biases)
    weights    = 4 P bytes x 4 copies        (parameters, gradients, Adam exp_avg and exp_avg_sq)
    activations= 4 B (3 F + 3 D) bytes       (pre-activations, codes and their gradient; x, x_hat, error)
    needed     = sum over the sweep of weights + max over the sweep of activations
                 (the SAEs of a sweep step one after another on the same batch)

compared with what the device has free: MemAvailable of /proc/meminfo (os.sysconf's available
pages where there is no /proc) on the CPU, `torch.cuda.mem_get_info` on a GPU. Deliberately
coarse: it catches a --d-sae that cannot fit before it takes the machine down, not a tight margin.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from saelab.errors import UsageError

FP32 = 4
COPIES = 4


def weight_bytes(d_in: int, d_sae: int, tied: bool = False) -> int:
    """Parameters, gradients and Adam state of one SAE (see the module docstring)."""
    return FP32 * COPIES * (d_in * d_sae * (1 if tied else 2) + d_sae + d_in)


def activation_bytes(d_in: int, d_sae: int, batch_size: int) -> int:
    """One training step's activations of one SAE (see the module docstring)."""
    return FP32 * batch_size * (3 * d_sae + 3 * d_in)


def sae_bytes(d_in: int, d_sae: int, batch_size: int, tied: bool = False) -> int:
    """Bytes one SAE needs to train."""
    return weight_bytes(d_in, d_sae, tied) + activation_bytes(d_in, d_sae, batch_size)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None when it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_memory(sae_cfgs: list, batch_size: int, device: torch.device, available: int | None = None) -> int:
    """Refuse a sweep whose SAEs and optimizer state would not fit in the free memory of `device`.

    Args:
        sae_cfgs: resolved SAE configs (d_in, d_sae, tied).
        available: free bytes (default: measured now).
    Returns:
        the bytes needed.
    Raises:
        UsageError: saying how much is needed and how much is free.
    """
    need = (sum(weight_bytes(c.d_in, c.d_sae, getattr(c, "tied", False)) for c in sae_cfgs)
            + max(activation_bytes(c.d_in, c.d_sae, batch_size) for c in sae_cfgs))
    free = available_bytes(device) if available is None else available
    if free is not None and need > free:
        sizes = ", ".join(f"d_sae {c.d_sae:,}" for c in sae_cfgs)
        raise UsageError(f"training {len(sae_cfgs)} SAE(s) ({sizes} on d_in {sae_cfgs[0].d_in:,}, batch "
                         f"{batch_size:,}) needs about {_gib(need)} on {device} (weights, gradients and Adam state: "
                         f"4 fp32 copies, plus one batch of activations), but only {_gib(free)} is free. Lower "
                         "--d-sae / --expansion-factor, train fewer SAEs at once, or lower --batch-size.")
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"
