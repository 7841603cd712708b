"""What every subcommand shares: saelab's argparse parser, --quiet/--verbose, and config-driven commands.

`config_command(sub, name, Config, handler, ...)` is the one way a subcommand whose options are a
config dataclass is registered: one flag per field (saelab.config), `--config FILE.yaml`, and
`--quiet/--verbose`. The handler receives the config built as defaults < YAML < flags:

    handler(cfg, args) -> exit code
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from saelab.config import add_dataclass_args, build_config, load_yaml


class Parser(argparse.ArgumentParser):
    """argparse with saelab's error format: 'saelab: error: ...' and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"saelab: error: {message}\n  Run `{self.prog} --help` for the options.\n")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """--quiet / --verbose on every subcommand."""
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings only; no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def config_from_args(cls: type, args: argparse.Namespace, what: str):
    """`cls` built from defaults < `args.config` (YAML) < the flags present in `args`."""
    yaml_data = load_yaml(args.config) if getattr(args, "config", None) else None
    return build_config(cls, args, yaml_data, source=args.config or f"{what} flags")


def config_command(sub, name: str, cls: type, handler: Callable, *, help: str, description: str | None = None,
                   epilog: str | None = None, exclude: tuple[str, ...] = (),
                   positionals: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """Register subcommand `name` whose options are the fields of the dataclass `cls`.

    Args:
        sub: the subparsers object.
        handler: called as handler(cfg, args) and returns the exit code.
        exclude: fields that get no flag (e.g. set by a positional argument instead).
        positionals: adds positional arguments before the flags.
    Returns:
        the subparser, for extra arguments that are not config fields.
    """
    p = sub.add_parser(name, help=help, description=description or help, epilog=epilog)
    if positionals is not None:
        positionals(p)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options below (flags win)")
    add_dataclass_args(p, cls, exclude=exclude, title=name)
    add_common_flags(p)
    p.set_defaults(func=lambda args: handler(config_from_args(cls, args, name), args))
    return p
