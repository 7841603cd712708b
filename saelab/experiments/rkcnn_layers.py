"""`saelab experiment rkcnn-layers`: the rkcnn-vs-baseline comparison repeated at every layer.

For each layer L in `layers` ("all" = 0 .. num_layers−1, or a comma-separated list), hook
h_L = hook_template.format(layer=L), and `rkcnn_compare.compare(cfg, store, h_L)` (same seeds,
steps and settings at every layer; see rkcnn_compare for the metrics and intervals). All hooks are
collected in one forward pass per batch into OUT/store unless --data is given (with --data and
"all", the layers are those of the store's hooks that match the template).

Writes into `out`: results.json (keys `RESULT_KEYS`; `layers[i]` holds the per-layer summary and
claims), dead_per_layer.png (validation dead fraction, mean ± std over seeds, both methods), and
under out/layer_NN/ each layer's runs, training_curves.png and dead_latents.png.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from saelab.config import grouped, to_dict
from saelab.errors import UsageError, raise_all
from saelab.experiments import rkcnn_compare as rc
from saelab.experiments.rkcnn_plots import plot_dead_latents, plot_dead_per_layer, plot_training_curves

log = logging.getLogger(__name__)

HELP = "rkcnn-vs-baseline at every layer: one plot of the dead-latent rate per layer for both methods"

RESULT_KEYS = ("experiment", "dry_run", "config", "store", "layer_indices", "layers", "plots", "seconds")
PLOTS = {"dead_per_layer": "dead_per_layer.png"}


@grouped
@dataclass
class Config(rc.CompareConfig):
    """Settings of rkcnn-layers (the comparison settings, plus which layers)."""

    layers: str = "all"
    """Layers to compare: all, or a comma-separated list such as 0,7,15,22,29."""
    hook_template: str = "model.layers.{layer}.mlp"
    """Hook name for layer {layer} (default: the MLP output)."""

    def __post_init__(self):
        super().__post_init__()
        p = []
        if "{layer}" not in self.hook_template:
            p.append(f"hook_template {self.hook_template!r} must contain {{layer}}")
        if self.layers != "all" and not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", self.layers):
            p.append(f"layers {self.layers!r} must be 'all' or comma-separated layer indices like 0,7,15")
        raise_all(p, "rkcnn-layers config")


def _store_layers(store: str, template: str) -> list[int]:
    from saelab.store import load_store

    pat = re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    return sorted(int(m.group(1)) for h in load_store(store).hooks if (m := pat.match(h)))


def resolve_layers(cfg: Config, store: str | None) -> list[int]:
    """The layer indices to compare. "all": the store's matching hooks, else the model's layers."""
    if cfg.layers != "all":
        return sorted({int(x) for x in cfg.layers.split(",")})
    if store is not None:
        found = _store_layers(store, cfg.hook_template)
        if not found:
            raise UsageError(f"--layers all: no hook of the store {store} matches {cfg.hook_template!r}; "
                             "pass --hook-template or an explicit --layers list.")
        return found
    from saelab.models import load_model

    return list(range(int(load_model(cfg.model, quiet=True).info["num_layers"])))


def run(cfg: Config, out: str | Path, dry_run: bool = False, quiet: bool = False) -> dict:
    """Run rkcnn-layers; write results.json and the PNGs into `out`; return the results."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        cfg = rc.dry_run_config(cfg, layers="0,1" if cfg.layers == "all" else cfg.layers)
        layers = resolve_layers(cfg, None)
        stores = {L: rc.synthetic_store(out / "store" / f"layer_{L:02d}", cfg.hook_template.format(layer=L), seed=L)
                  for L in layers}
    else:
        layers = resolve_layers(cfg, cfg.data)
        hooks = [cfg.hook_template.format(layer=L) for L in layers]
        store = cfg.data or rc.collect_store(cfg, hooks, out, quiet)
        stores = {L: store for L in layers}
    per_layer = []
    for L in layers:
        hook = cfg.hook_template.format(layer=L)
        d_in = rc.check_hook(stores[L], hook)
        ldir = out / f"layer_{L:02d}"
        log.info("layer %d: %s", L, hook)
        with rc.threads(1 if dry_run else None):
            res = rc.compare(cfg, stores[L], hook, ldir, quiet)
        plot_training_curves(ldir / rc.PLOTS["training_curves"], res["curves"], title=hook)
        plot_dead_latents(ldir / rc.PLOTS["dead_latents"], res["per_seed"], title=hook)
        per_layer.append({"layer": L, "hook": hook, "store": stores[L], "d_in": d_in, "per_seed": res["per_seed"],
                          "summary": res["summary"], "mined_vs_others": res["mined_vs_others"],
                          "claims": res["claims"]})
    stats = {m: [(e["summary"]["dead_frac"][m]["mean"], e["summary"]["dead_frac"][m]["std"]) for e in per_layer]
             for m in rc.METHODS}
    plot_dead_per_layer(out / PLOTS["dead_per_layer"], layers, stats, cfg.hook_template)
    results = {"experiment": "rkcnn-layers", "dry_run": dry_run, "config": to_dict(cfg),
               "store": sorted(set(stores.values())), "layer_indices": layers, "layers": per_layer,
               "plots": dict(PLOTS), "seconds": round(time.time() - t0, 1)}
    rc.write_results(out, results)
    return results


def summary(results: dict) -> str:
    """One block per layer (dead fraction, L0, FVU) and the claims."""
    cfg = results["config"]
    lines = [f"rkcnn-layers: {cfg['hook_template']}, layers {results['layer_indices']}, {cfg['architecture']} "
             f"d_sae={cfg['d_sae']}, {cfg['steps']} steps, {cfg['seeds']} seeds" + ("  [dry run]" if results["dry_run"] else "")]
    for e in results["layers"]:
        s = {k: e["summary"][k] for k in ("dead_frac", "l0", "fvu")}
        c = e["claims"]
        lines.append(f"layer {e['layer']}: fewer dead {'yes' if c['fewer_dead'] else 'no'}, FVU not worse "
                     f"{'yes' if c['fvu_not_worse'] else 'no'}")
        lines += rc.summary_lines(s, cfg["level"])[1:]
    return "\n".join(lines)


__all__ = ["Config", "HELP", "run", "summary", "resolve_layers", "RESULT_KEYS", "PLOTS"]
