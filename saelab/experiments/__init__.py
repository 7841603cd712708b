"""Experiments: end-to-end studies that write a results JSON and PNG plots into an output directory.

Each experiment is one module here and one line in `EXPERIMENTS` (name -> module path). The CLI
(`saelab experiment NAME`) builds one sub-subcommand per entry. A module provides:

    HELP: str                                   one line for `saelab experiment --help`
    Config: a dataclass                         its fields become the flags and YAML keys
    run(cfg, out, dry_run=False, quiet=False) -> dict
                                                writes out/results.json + PNGs, returns the results;
                                                dry_run shrinks the work to seconds on synthetic data
    summary(results: dict) -> str               a few human-readable lines (the CLI prints them)

Experiments are L3: they may use anything below them (rkcnn, toy, saes, train, evaluate, models).
"""
from __future__ import annotations

# name (as typed after `saelab experiment`) -> module. Adding an experiment = one line here.
EXPERIMENTS: dict[str, str] = {
    "toy": "saelab.experiments.toy",
    "reasoning": "saelab.experiments.reasoning",
    "rkcnn-vs-baseline": "saelab.experiments.rkcnn_compare",
    "rkcnn-layers": "saelab.experiments.rkcnn_layers",
    "rkcnn-arms": "saelab.experiments.rkcnn_arms",
    "circuits": "saelab.experiments.circuits",
}
