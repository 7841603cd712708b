"""Training SAEs on an activation store (or streamed from a model): `train(cfg) -> TrainResult`.

Modules, in the order a run meets them:
  config.py      `TrainConfig` and its automatic defaults (`resolve_auto`, `sae_configs`)
  sources.py     where batches come from: a store and its splits, or a model over a corpus
  init.py        data-driven decoder initialisation (`--init rkcnn|data_rows|kmeans|pca`)
  loop.py        `train` and the one `step_` function; DDP; NaN guards
  schedule.py    learning-rate and sparsity ramps, dead-latent tracking and resampling
  sinks.py       metrics.jsonl, TensorBoard, W&B and the curves plot
  validation.py  metrics on the split the SAE never trained on; `evaluate_checkpoint`
  checkpoint.py  `RunState` and resumable step checkpoints (safetensors + JSON)
"""
from saelab.train.config import (
    AUTO_DEFAULTS, LORA_SAE_DEFAULTS, SWEEP_FIELDS, TrainConfig, check_sae_options, lora_train_defaults,
    quick_test_config, resolve_auto, sae_configs,
)
from saelab.train.init import init_dirs, init_encoder_, orient_heavy_tail
from saelab.train.loop import RunResult, TrainResult, distribute_, step_, train
from saelab.train.validation import evaluate_checkpoint, evaluate_sae

__all__ = ["AUTO_DEFAULTS", "LORA_SAE_DEFAULTS", "SWEEP_FIELDS", "RunResult", "TrainConfig", "TrainResult",
           "check_sae_options", "evaluate_checkpoint", "evaluate_sae", "init_dirs", "init_encoder_", "lora_train_defaults",
           "orient_heavy_tail", "quick_test_config", "resolve_auto", "sae_configs", "distribute_", "step_", "train"]
