"""SAE architectures: a small base class, one file per architecture, the registry and `load_sae`.

    from saelab.saes import REGISTRY, make_sae, load_sae
    cfg = REGISTRY["topk"][1](d_in=576, d_sae=4608, k=32)
    sae = make_sae(cfg)

Modules: base.py (SAEConfig, SAE: encode/decode/forward/save, TrainOutput), relu.py, topk.py,
batchtopk.py, jumprelu.py (one architecture each), ops.py (shared kernels), registry.py (REGISTRY,
make_sae, read_cfg, load_sae). Shape legend: see base.py.
"""
from saelab.saes.base import FORMAT_VERSION, SAE, InitDirs, SAEConfig, TrainOutput
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.saes.registry import REGISTRY, load_sae, make_sae, read_cfg
from saelab.saes.relu import ReLUConfig, ReLUSAE
from saelab.saes.topk import TopKConfig, TopKSAE

__all__ = ["InitDirs", "REGISTRY", "make_sae", "load_sae", "read_cfg", "SAE", "SAEConfig", "TrainOutput", "FORMAT_VERSION",
           "ReLUConfig", "ReLUSAE", "TopKConfig", "TopKSAE", "BatchTopKConfig", "BatchTopKSAE",
           "JumpReLUConfig", "JumpReLUSAE"]
