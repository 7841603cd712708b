"""`saelab train`: flags and YAML -> TrainConfig -> saelab.train.train; `--eval-only` evaluates a saved SAE.

Flags come from `TrainConfig` (saelab/train.py) plus one group with the options of every SAE
architecture's config class (saelab/saes/*.py; d_in always comes from the store). Precedence:
defaults < `--config file.yaml` < flags. A YAML file may hold any TrainConfig key and any SAE option
key (top level, or under `sae_options:`); an unknown key is an error that names it. The Kimi-K2
recipe's spellings (`--data_dir --output_dir --num_shards --target_layer --d_model --d_sae
--l1_coeff --lr --batch_size --epochs --num_workers`) are rewritten by `saelab.cli.FLAG_ALIASES`.
--architecture, --expansion-factor, --k and --batch-size left unset are chosen by `train` once the
store is open (`saelab.train.resolve_auto`): BatchTopK x16, k 50, batch 1024 on a LoRA store.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from saelab.cli.common import add_common_flags
from saelab.config import add_dataclass_args, build_config, flat_fields, load_yaml
from saelab.errors import UsageError, did_you_mean
from saelab.models import check_device
from saelab.saes import REGISTRY
from saelab.train import SWEEP_FIELDS, TrainConfig, check_sae_options, evaluate_checkpoint, train


def _sae_option_fields() -> dict[str, type]:
    """Option name -> first config class defining it, over all architectures (registry order)."""
    taken = set(flat_fields(TrainConfig)) | set(SWEEP_FIELDS)
    out: dict[str, type] = {}
    for _, cfg_cls in REGISTRY.values():
        for f in dataclasses.fields(cfg_cls):
            if f.name not in taken and f.name not in out:
                out[f.name] = cfg_cls
    return out


def register(sub) -> None:
    """Add `saelab train` to the `saelab` parser."""
    p = sub.add_parser("train", help="train sparse autoencoders on an activation store",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options below")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --load-checkpoint on the validation split and print the metrics")
    p.add_argument("--load-checkpoint", metavar="DIR", help="SAE directory for --eval-only")
    add_dataclass_args(p, TrainConfig, exclude=("sae_options",), title="training")
    g = p.add_argument_group("SAE options", "Each applies to the architectures whose config has it; the default "
                             "shown is the first such architecture's, and each architecture keeps its own.")
    by_class: dict[type, list[str]] = {}
    for name, cls in _sae_option_fields().items():
        by_class.setdefault(cls, []).append(name)
    for cls, names in by_class.items():
        exclude = tuple(f.name for f in dataclasses.fields(cls) if f.name not in names)
        add_dataclass_args(g, cls, exclude=exclude, title=False)
    add_common_flags(p)
    p.set_defaults(func=run)


def build_train_config(args: argparse.Namespace):
    """TrainConfig from defaults < YAML < flags, with SAE options gathered into `sae_options`."""
    sae_fields = _sae_option_fields()
    train_fields = set(flat_fields(TrainConfig))
    data = load_yaml(args.config) if args.config else {}
    source = f"config file {args.config}"
    sae_options = dict(data.pop("sae_options", None) or {})
    unknown = []
    for key in list(data):
        name = key.replace("-", "_")
        if name in sae_fields:
            sae_options[name] = data.pop(key)
        elif name not in train_fields:
            unknown.append(f'unknown key "{key}".{did_you_mean(name, list(train_fields) + list(sae_fields))}')
    for key in sae_options:
        if key not in sae_fields:
            unknown.append(f'unknown SAE option "{key}" under sae_options.{did_you_mean(key, sae_fields)}')
    if unknown:
        raise UsageError(f"{source} has problems:\n" + "\n".join(f"  - {u}" for u in unknown))
    sae_options.update({k: v for k, v in vars(args).items() if k in sae_fields})
    cfg = build_config(TrainConfig, args, data, source=source if args.config else "flags")
    cfg = dataclasses.replace(cfg, sae_options=sae_options)
    _check_sae_options(cfg, sae_fields)
    return cfg


def _check_sae_options(cfg, sae_fields) -> None:
    """Early check when --architecture is given; an unset one is decided (and checked) by `train`,
    once the store tells whether it is a LoRA store (saelab.train.resolve_auto)."""
    if cfg.architecture is not None:
        check_sae_options(cfg.architecture, cfg.sae_options)


def run(args: argparse.Namespace) -> int:

    if args.eval_only:
        if not args.load_checkpoint:
            raise UsageError("--eval-only needs --load-checkpoint DIR (an SAE directory such as OUT/sae_best).")
        kw = {k: getattr(args, k) for k in ("batch_size", "eval_tokens", "device") if hasattr(args, k)}
        if kw.get("device") == "auto":
            kw["device"] = "cpu"
        check_device(kw.get("device", "cpu"))
        metrics = evaluate_checkpoint(args.load_checkpoint, data=getattr(args, "data", None),
                                      hook=getattr(args, "hook", None), **kw)
        print(json.dumps(metrics, indent=2))
        return 0
    cfg = build_train_config(args)
    result = train(cfg, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        if result.resumed_from:
            print(f"resumed at step {result.resumed_from}: {result.steps - result.resumed_from} steps in this run, "
                  f"{result.steps} in all")
        for r in result.runs:
            m = r.final_metrics
            print(f"{r.name}: val loss {m['val_loss']:.4g}  FVU {m['val_fvu']:.4f}  L0 {m['val_l0']:.1f}  "
                  f"dead {100 * m['val_dead_frac']:.1f}%  best: {r.best_dir}  final: {r.final_dir}",
                  file=sys.stdout)
    return 0
