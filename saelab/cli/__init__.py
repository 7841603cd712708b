"""The `saelab` command: argparse subcommands, logging set-up and exit codes.

This package is the only place that reads argv, configures logging handlers and chooses exit codes.
Each module here registers the subcommands of one pipeline stage through `register(subparsers)`;
the handlers call the library and print.

Exit codes: 0 success, 1 a check failed (e.g. `verify` found a bad chunk), 2 usage error (bad flag,
file or config; message only, no traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from saelab import __version__
from saelab.cli.common import Parser
from saelab.errors import UsageError

# One module per pipeline stage; each defines register(subparsers).
_COMMAND_MODULES = ["collect", "store", "models", "train", "evaluate", "interpret", "export", "experiment", "intervene",
                    "finetune", "demo", "importing", "autointerp", "circuit"]

# Legacy and recipe flag spellings -> saelab's own flag. One table for the whole CLI (STYLE.md).
# The Kimi-K2 SAE recipe's names work unchanged as aliases.
FLAG_ALIASES: dict[str, str] = {
    "--data_dir": "--data",
    "--output_dir": "--out",
    "--num_shards": "--num-shards",
    "--target_layer": "--layer",
    "--d_model": "--d-in",
    "--d_sae": "--d-sae",
    "--l1_coeff": "--l1-coeff",
    "--lr": "--lr",
    "--batch_size": "--batch-size",
    "--epochs": "--epochs",
    "--num_workers": "--num-workers",
    "--sae_path": "--sae",
    "--statistics": "--statistics",
    "--feature_id": "--feature",
    "--top_k": "--top-k",
}


def rewrite_aliases(argv: list[str]) -> list[str]:
    """Replace alias flags (also in `--flag=value` form) by saelab's spelling."""
    out = []
    for tok in argv:
        flag, eq, value = tok.partition("=")
        if flag in FLAG_ALIASES:
            tok = FLAG_ALIASES[flag] + (eq + value if eq else "")
        out.append(tok)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="saelab", description="Sparse autoencoders for language-model activations.")
    parser.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"saelab.cli.{name}").register(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "accelerate", "torch", "urllib3", "matplotlib", "PIL", "filelock", "botocore",
                  "aiobotocore", "s3fs", "fsspec", "gcsfs", "google"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _set_threads(threads: str | None) -> None:
    """Honour SAELAB_TORCH_THREADS (torch's intra-op threads) in every subcommand; unset = torch's own choice."""
    if not threads:
        return
    if not threads.isdigit() or int(threads) < 1:
        raise UsageError(f"SAELAB_TORCH_THREADS must be a positive integer, got {threads!r}; unset it to let "
                         "torch choose")
    import torch

    torch.set_num_threads(int(threads))


def main(argv: list[str] | None = None) -> int:
    argv = rewrite_aliases(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args)
    try:
        _set_threads(os.environ.get("SAELAB_TORCH_THREADS"))
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("saelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `saelab verify STORE | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run() -> None:
    """The `saelab` program (console script and `python -m saelab`): `main()`, then exit with its code.

    A rank under torchrun leaves with `os._exit` once its output is flushed: left to interpreter
    exit, gloo's C++ teardown aborts a rank now and then (SIGABRT, "terminate called without an
    active exception"; 2 of 25 two-rank `saelab train` runs here, 6 of 39 with destroy_process_group
    first, 0 of 38 this way: docs/reliability.md), after every result is written, and torchrun then
    reports the run as failed. Every command closes its files before it returns, so nothing is lost.
    """
    rc = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
