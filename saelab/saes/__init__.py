"""SAE architectures and the explicit registry: name -> (SAE class, config class).

    from saelab.saes import REGISTRY, make_sae, load_sae
    cfg = REGISTRY["topk"][1](d_in=576, d_sae=4608, k=32)
    sae = make_sae(cfg)

Names (`relu`, `topk`, `batchtopk`, `jumprelu`) are the file names, the `architecture` value in
cfg.json and the CLI values.
"""
from __future__ import annotations

from saelab.saes.base import SAE, FORMAT_VERSION, InitDirs, SAEConfig, TrainOutput, load_sae, read_cfg
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.saes.relu import ReLUConfig, ReLUSAE
from saelab.saes.topk import TopKConfig, TopKSAE

REGISTRY: dict[str, tuple[type[SAE], type[SAEConfig]]] = {
    "relu": (ReLUSAE, ReLUConfig),
    "topk": (TopKSAE, TopKConfig),
    "batchtopk": (BatchTopKSAE, BatchTopKConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUConfig),
}


def make_sae(cfg: SAEConfig, init_dirs_FD: InitDirs = None, d_in: int | None = None,
             device: str | None = None) -> SAE:
    """A freshly initialised SAE for `cfg` (d_in / d_sae resolved; see SAEConfig.resolved).

    Args:
        cfg: an architecture config (its class picks the architecture).
        init_dirs_FD: decoder directions for the first latents (tensor [M, D] or callable), or None.
        d_in: activation width, used when cfg.d_in is 0.
        device: where to put the parameters.
    """
    from saelab.errors import UsageError

    if cfg.architecture not in REGISTRY:
        raise UsageError(f"unknown architecture {cfg.architecture!r}; known: {', '.join(sorted(REGISTRY))}.")
    sae = REGISTRY[cfg.architecture][0](cfg.resolved(d_in), init_dirs_FD=init_dirs_FD)
    return sae.to(device) if device else sae


__all__ = ["REGISTRY", "make_sae", "load_sae", "read_cfg", "SAE", "SAEConfig", "TrainOutput", "FORMAT_VERSION",
           "ReLUConfig", "ReLUSAE", "TopKConfig", "TopKSAE", "BatchTopKConfig", "BatchTopKSAE",
           "JumpReLUConfig", "JumpReLUSAE"]
