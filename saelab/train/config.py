"""The training configuration and its automatic defaults: the one place "auto" is decided.

`TrainConfig` is every option of `saelab train` (field name = flag = YAML key; the attribute
docstring is the --help text). Four fields default to None, "not set by flag or YAML", and are
filled once the store is open by `resolve_auto`:

    value = user's value  if set,  else LORA_SAE_DEFAULTS[field]  on a LoRA store,  else AUTO_DEFAULTS[field]

`sae_configs` turns a resolved config into one SAE config per member of the sweep (expansion
factors x k values); `quick_test_config` is the seconds-long run behind `--quick-test`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from saelab.config import config_from_dict, group, grouped
from saelab.corpus import CorpusConfig
from saelab.errors import UsageError, raise_all
from saelab.models import ModelConfig
from saelab.rkcnn import RkcnnConfig
from saelab.saes import REGISTRY
from saelab.store.synthetic import make_synthetic_store

log = logging.getLogger(__name__)


# Where LoRA SAE work usually starts (the issue "LoRA adapter SAEs"): a store of a lora: hook is small
# (e.g. 210 wide), so a wide dictionary and a smaller batch are cheap. d_in always comes from the store.
LORA_SAE_DEFAULTS = {"architecture": "batchtopk", "expansion_factor": [16], "k": [50], "batch_size": 1024}


def lora_train_defaults(store_meta: dict, hook: str) -> dict:
    """LORA_SAE_DEFAULTS when `hook` is a LoRA hook of this store (store.json has its slice map), else {}.

    The training loop applies them to the fields the user did not set (flags and YAML win).
    """
    return dict(LORA_SAE_DEFAULTS) if (store_meta.get("slices") or {}).get(hook) else {}


@grouped
@dataclass
class TrainConfig:
    """Everything `saelab train` needs; field name = flag = YAML key. SAE-specific options (e.g.
    `aux_k`) come from the architecture's own config class and travel in `sae_options`."""

    lm: ModelConfig = group(ModelConfig, model=None, device="auto", exclude=("adapter",))
    """--model to stream activations from instead of a store (with --corpus); --device and --dtype
    also say where and in which compute dtype the SAEs train."""
    text: CorpusConfig = group(CorpusConfig, max_length=256)
    """--corpus to stream through --model, and its packing."""

    data: str | None = None
    """Activation store directory (from `saelab collect`), or its URL on object storage (s3://bucket/run)."""
    hook: str | None = None
    """Hook point to train on; default: the store's only hook."""
    layer: int | None = None
    """Shorthand for --hook model.layers.N (the residual stream after decoder layer N)."""
    out: str = "runs/train"
    """Output directory (checkpoints, sae_best/, final/, metrics)."""
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu"] | None = None
    """SAE architecture; None (unset) = auto: topk, or batchtopk on a LoRA store (see AUTO_DEFAULTS)."""
    expansion_factor: list[int] | None = None
    """d_sae = expansion_factor * d_in; several values (comma-separated) train one SAE each;
    None (unset) = auto: 8, or 16 on a LoRA store."""
    d_sae: int | None = None
    """Number of latents; overrides --expansion-factor."""
    d_in: int | None = None
    """Expected activation width; checked against the store (d_in is always read from the store)."""
    k: list[int] | None = None
    """Active latents per token (topk, batchtopk); several values (comma-separated) sweep in one pass;
    None (unset) = auto: 32, or 50 on a LoRA store."""
    l1_coeff: float | None = None
    """Sparsity coefficient (relu: L1, jumprelu: L0); default: the architecture's own default."""
    lr: float | None = None
    """Adam learning rate (peak, after warmup); None (unset) = auto: 1e-3 for topk and batchtopk,
    3e-4 for relu and jumprelu (see AUTO_LR)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    warmup_steps: int = 100
    """Linear learning-rate warmup steps."""
    decay_fraction: float = 0.2
    """Decay the learning rate linearly to 0 over this final fraction of the steps."""
    sparsity_warmup_steps: int = 0
    """Ramp the sparsity coefficient linearly from 0 over this many steps."""
    batch_size: int | None = None
    """Tokens per step and per process (global batch = batch_size * world size); None (unset) = auto:
    4096, or 1024 on a LoRA store."""
    epochs: int = 1
    """Passes over the training split (ignored when --tokens is given)."""
    tokens: int | None = None
    """Train on this many tokens (global), cycling the store if needed; overrides --epochs."""
    eval_every: int = 500
    """Evaluate on the validation split every N steps (0: only at the end)."""
    eval_tokens: int = 262_144
    """Validation tokens per evaluation (the same ones every time)."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint OUT/step_NNNNNN/ every N steps (0: never)."""
    keep_checkpoints: int = 2
    """Keep only the newest N step checkpoints (0: keep all)."""
    val_fraction: float = 0.05
    """Fraction of the store's chunks held out for validation."""
    num_shards: int | None = None
    """Read only the first N shards of the store."""
    num_workers: int = 0
    """Accepted for the Kimi-K2 recipe; saelab reads memory-mapped chunks in-process, so this only
    sets torch's intra-op threads when > 0."""
    seed: int = 0
    """Seed for initialisation and data order."""
    keep_outliers: bool = False
    """Also train on rows that collect flagged as massive activations (left out by default)."""
    shuffle_chunks: int = 8
    """Chunks mixed in the shuffle buffer (RAM ~ shuffle_chunks * chunk size)."""
    prefetch_chunks: int | None = None
    """With --data on object storage (s3://...): chunks fetched ahead in a background thread; default
    --shuffle-chunks, so the next shuffle group arrives while this one trains (RAM ~ (shuffle_chunks +
    prefetch_chunks + 1) * chunk size). 0 fetches in the training thread. The batches are the same."""
    init_tokens: int = 16_384
    """Tokens sampled to estimate the input scale and b_dec (geometric median)."""
    init: Literal["random", "rkcnn", "data_rows", "kmeans", "pca"] = "random"
    """Decoder initialisation: random, or --rkcnn-fraction of the rows from the init sample: rkcnn directions
    (saelab.rkcnn), random centred data rows, k-means centres or PCA axes."""
    rkcnn: RkcnnConfig = group(RkcnnConfig)
    """--rkcnn-* options of the data-driven inits (saelab/rkcnn/init.py); defaults are the method's."""
    dead_window: int = 1000
    """A latent that has not fired for this many steps counts as dead."""
    resample_dead: bool = False
    """relu only: every dead_window steps re-initialise dead latents toward badly reconstructed inputs."""
    log_every: int = 10
    """Write training metrics every N steps."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless WANDB_MODE or an API key is set)."""
    wandb_project: str = "saelab"
    """W&B project name."""
    resume: bool = False
    """Continue from the newest intact OUT/step_NNNNNN/ checkpoint."""
    overwrite: bool = False
    """Delete the run already in OUT (its checkpoints, SAEs and metrics) and start again; without it
    (or --resume) an OUT that holds a run is refused."""
    quick_test: bool = False
    """Tiny end-to-end run in seconds (synthetic store if --data is not given)."""
    shuffle_buffer: int = 65_536
    """Tokens in the shuffle buffer when streaming from a model."""
    sae_options: dict = field(default_factory=dict)
    """Extra fields of the architecture's config class (e.g. aux_k); YAML keys or flags."""

    def __post_init__(self):
        p = []
        for name in ("lr", "l1_coeff", "beta1", "beta2", "decay_fraction", "val_fraction"):  # rkcnn_*: RkcnnConfig
            v = getattr(self, name)
            if isinstance(v, float) and not math.isfinite(v):
                p.append(f"{name} must be a finite number, got {v}")
        if p:  # every check below would let NaN through (all its comparisons are False)
            raise_all(p, "invalid training config")
        if self.resume and self.overwrite:
            p.append("--resume continues the run in --out and --overwrite deletes it: give one of them")
        for name in ("lr", "batch_size", "epochs", "eval_tokens", "init_tokens", "dead_window",
                     "log_every", "shuffle_chunks"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                p.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "sparsity_warmup_steps", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefetch_chunks is not None and self.prefetch_chunks < 0:
            p.append(f"prefetch_chunks must be >= 0, got {self.prefetch_chunks}")
        if not 0 <= self.decay_fraction <= 1:
            p.append(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0 < self.val_fraction < 1:
            p.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            p.append(f"Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.k is not None and (not self.k or any(k <= 0 for k in self.k)):
            p.append(f"k must be a non-empty list of positive integers, got {self.k}")
        if self.expansion_factor is not None and (not self.expansion_factor or any(e <= 0 for e in self.expansion_factor)):
            p.append(f"expansion_factor must be positive, got {self.expansion_factor}")
        if self.hook is not None and self.layer is not None and self.hook != f"model.layers.{self.layer}":
            p.append(f"--hook {self.hook} and --layer {self.layer} disagree; give one of them")
        if self.resample_dead and self.architecture != "relu":
            p.append(f"resample_dead is for relu SAEs (TopK-family SAEs use AuxK), not "
                     f"{self.architecture or 'the automatic choice (topk/batchtopk); pass --architecture relu'}")
        if self.tokens is not None and self.tokens <= 0:
            p.append(f"tokens must be > 0, got {self.tokens}")
        if (self.lm.model is None) != (self.text.corpus is None):
            p.append("streaming needs both --model and --corpus")
        raise_all(p, "invalid training config")
        if self.layer is not None and self.hook is None:
            self.hook = f"model.layers.{self.layer}"


AUTO_DEFAULTS: dict[str, Any] = {"architecture": "topk", "expansion_factor": [8], "k": [32], "batch_size": 4096}
"""What an unset (None) architecture / expansion_factor / k / batch_size becomes on an ordinary store.
On a LoRA store (`lora_train_defaults` non-empty) those values are used instead."""


AUTO_LR: dict[str, float] = {"topk": 1e-3, "batchtopk": 1e-3, "relu": 3e-4, "jumprelu": 3e-4}
"""The learning rate an unset --lr becomes, by architecture. TopK's 1e-3 comes from a sweep on the
embedded model (docs/data-fidelity.md, "Learning rate"): 3e-4 left short runs far from where they
could be (per-token relative error 0.40 vs 0.33 at 60k tokens), 4e-3 killed 8% of the latents.
ReLU and JumpReLU keep 3e-4: not swept."""


MIN_AUTO_STEPS = 200
"""An unset batch size is halved (down to 256) until the run has at least this many steps."""


def resolve_auto(cfg: TrainConfig, lora_defaults: dict[str, Any] | None = None,
                 run_tokens: int | None = None) -> TrainConfig:
    """Fill the fields left unset (None) by flags and YAML; the one place "auto" is decided.

        value = user's value  if set,  else lora_defaults[field]  if given,  else AUTO_DEFAULTS[field]
        architecture = relu   when unset and --l1-coeff is given (the Kimi-K2 recipe's ReLU + L1 SAE)
        batch_size  : halved from the default (not below 256) while run_tokens / batch_size < MIN_AUTO_STEPS,
                      so a short run (60k tokens) takes ~200 steps, not 15
        lr          = AUTO_LR[architecture]  when unset

    Args:
        cfg: a TrainConfig; fields already set are kept.
        lora_defaults: ``lora_train_defaults(store.meta, hook)`` ({} for an ordinary hook).
        run_tokens: tokens the run will train on, when known (--tokens, or the training split x epochs).
    Returns:
        a TrainConfig with no unset AUTO_DEFAULTS field (cfg itself when nothing was unset).
    """
    fill = {**AUTO_DEFAULTS, **{k: v for k, v in (lora_defaults or {}).items() if k in AUTO_DEFAULTS}}
    if cfg.architecture is None and cfg.l1_coeff is not None:
        fill["architecture"] = "relu"
        log.warning("--l1-coeff without --architecture: training a ReLU + L1 SAE (the architecture an L1 "
                    "coefficient belongs to); pass --architecture to choose another")
    changes = {k: (list(v) if isinstance(v, list) else v) for k, v in fill.items() if getattr(cfg, k) is None}
    if "batch_size" in changes and run_tokens:
        b = changes["batch_size"]
        while b > 256 and run_tokens / b < MIN_AUTO_STEPS:
            b //= 2
        if b != changes["batch_size"]:
            log.info("batch size %d (not %d): %s training tokens give %d steps", b, changes["batch_size"],
                     f"{run_tokens:,}", run_tokens // b)
        changes["batch_size"] = b
    if cfg.lr is None:
        changes["lr"] = AUTO_LR[changes.get("architecture", cfg.architecture)]
    if not changes:
        return cfg
    if lora_defaults:
        log.info("LoRA store: %s (set by neither flag nor YAML)", ", ".join(f"{k}={v}" for k, v in changes.items()))
    return dataclasses.replace(cfg, **changes)


SWEEP_FIELDS = ("d_in", "d_sae", "expansion_factor", "k", "l1_coeff", "l0_coeff")
"""SAE config fields that TrainConfig decides for every architecture (d_in is read from the store)."""


def check_sae_options(architecture: str, sae_options: dict) -> None:
    """Raise a UsageError naming the `sae_options` keys that `architecture`'s config class lacks."""
    cls = REGISTRY[architecture][1]
    own = {f.name for f in dataclasses.fields(cls)}
    wrong = [k for k in sae_options if k not in own]
    if wrong:
        raise UsageError(f"option(s) {', '.join(wrong)} do not apply to {architecture} SAEs "
                         f"({cls.__name__} has: {', '.join(sorted(own - set(SWEEP_FIELDS)))}). "
                         "Drop them or choose another --architecture.")


def sae_configs(cfg: TrainConfig, d_in: int) -> list[tuple[str, Any]]:
    """(run name, SAE config) for every SAE of the sweep: expansion factors x k values, in order.

    Raises:
        UsageError: unknown or bad architecture options (all listed), or --l1-coeff for TopK.
    """
    cfg = resolve_auto(cfg)
    check_sae_options(cfg.architecture, cfg.sae_options)
    _, cfg_cls = REGISTRY[cfg.architecture]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    uses_k = "k" in names
    d_saes = [cfg.d_sae] if cfg.d_sae is not None else [e * d_in for e in cfg.expansion_factor]
    base = dict(cfg.sae_options)
    if cfg.l1_coeff is not None:
        coeff = next((n for n in ("l1_coeff", "sparsity_coeff", "l0_coeff") if n in names), None)
        if coeff is None:
            raise UsageError(f"--l1-coeff does not apply to {cfg.architecture} SAEs (they have no sparsity "
                             "coefficient); drop it or choose --architecture relu or jumprelu.")
        base[coeff] = cfg.l1_coeff
    out = []
    for d_sae in d_saes:
        for k in (cfg.k if uses_k else [None]):
            values = {**base, "d_in": d_in, "d_sae": d_sae, **({"k": k} if k is not None else {})}
            sae_cfg = config_from_dict(cfg_cls, values, f"{cfg.architecture} SAE options")
            x = f"{d_sae // d_in}" if d_sae % d_in == 0 else f"{d_sae / d_in:.3g}"
            out.append((cfg.architecture + (f"_k{k}" if k is not None else "") + f"_x{x}", sae_cfg))
    return out


def quick_test_config(cfg: TrainConfig) -> TrainConfig:
    """A tiny run (seconds): small SAE, 60 steps, and a synthetic store when no --data is given."""
    changes: dict[str, Any] = dict(
        quick_test=False, batch_size=256, tokens=256 * 60, epochs=1, eval_every=20, eval_tokens=2048,
        checkpoint_every=30, warmup_steps=5, init_tokens=2048, log_every=5, expansion_factor=[4], d_sae=None,
        lr=1e-3, k=[k for k in cfg.k or [] if k <= 16] or [8], dead_window=20, shuffle_chunks=2)
    if cfg.data is None:
        root = Path(tempfile.mkdtemp(prefix="saelab_quick_"))
        make_synthetic_store(root / "store", d_in=32, n_tokens=32_768, chunk_tokens=2048, seed=cfg.seed)
        changes.update(data=str(root / "store"), hook=None, layer=None, d_in=None, model=None, corpus=None)
        if cfg.out == TrainConfig.out:
            changes["out"] = str(root / "run")
    return dataclasses.replace(cfg, **changes)
