"""`saelab experiment NAME`: run one of the studies in `saelab.experiments` and print its verdict.

One sub-subcommand per entry of `saelab.experiments.EXPERIMENTS`; its flags come from the
experiment's `Config` dataclass (defaults < `--config file.yaml` < flags), plus `--out`,
`--dry-run` (seconds, for a smoke test) and `--quiet/--verbose`. Results JSON and PNGs go to --out.
Exit code 0 whether the experiment's PASS/FAIL verdict is PASS or FAIL: a negative result is a result.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

from saelab.cli.common import config_command
from saelab.experiments import EXPERIMENTS


def register(sub) -> None:
    """Add `experiment` and one sub-subcommand per registered experiment to the `saelab` parser."""
    p = sub.add_parser("experiment", help="run an experiment: results JSON + PNG plots",
                       description="Run an experiment; each writes results.json and PNG plots to --out.")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", parser_class=type(p))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    for name, module_path in EXPERIMENTS.items():
        mod = importlib.import_module(module_path)
        q = config_command(esub, name, mod.Config, functools.partial(_run, mod), help=mod.HELP,
                           description=mod.__doc__.split("\n\n")[0])
        q.add_argument("--out", type=Path, default=Path("runs") / f"experiment-{name}",
                       help=f"directory for results.json and the plots (default: runs/experiment-{name})")
        q.add_argument("--dry-run", action="store_true", help="tiny settings: runs in seconds (smoke test)")


def _run(mod, cfg, args) -> int:
    results = mod.run(cfg, args.out, dry_run=args.dry_run, quiet=args.quiet)
    print(mod.summary(results))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0
