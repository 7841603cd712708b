"""`saelab export`: write a saved SAE in another tool's format (SAELens today)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add `saelab export` to the `saelab` parser."""
    from saelab.cli.common import add_common_flags

    p = sub.add_parser("export", help="write a saved SAE in another tool's format (SAELens)",
                       description="Write a saved SAE directory in another tool's format.")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE directory written by `saelab train` (e.g. runs/x/sae_best)")
    p.add_argument("out", metavar="OUT", help="directory to write")
    p.add_argument("--format", choices=["saelens"], default="saelens", help="output format (default: saelens)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_common_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from saelab.export import export_saelens

    out = export_saelens(args.sae_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {out}/cfg.json and {out}/sae_weights.safetensors (SAELens format)")
    return 0
