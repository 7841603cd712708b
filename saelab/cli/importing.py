"""`saelab import`: turn an SAE trained by another library into a saelab SAE directory.

    saelab import --format saelens SRC OUT [--hook NAME] [--model NAME] [--overwrite]

OUT then holds cfg.json, model.safetensors and metadata.json like any `saelab train` output, so
evaluate, interpret, dashboard, intervene and circuits take it with --sae OUT. The conversion
itself (and every convention it maps) is in saelab/saes/formats/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from saelab.cli import add_common_flags
from saelab.errors import UsageError
from saelab.saes import load_sae
from saelab.saes.formats import READERS, load_foreign


def register(sub) -> None:
    """Add `saelab import` to the `saelab` parser."""
    p = sub.add_parser("import", help="convert an SAE from SAELens, sparsify, dictionary_learning or .npz",
                       description="Convert an SAE trained by another library into a saelab SAE directory. "
                                   "dictionary_learning's ae.pt is read with torch.load(weights_only=True) only.")
    p.add_argument("src", metavar="SRC", help="the SAE's directory or file (detected when --format is left out)")
    p.add_argument("out", metavar="OUT", help="saelab SAE directory to write")
    p.add_argument("--format", choices=sorted(READERS), default=None,
                   help="source format (default: detected from the files)")
    p.add_argument("--hook", default=None,
                   help="saelab hook name to record (default: mapped from the source's hook name)")
    p.add_argument("--model", default=None, help="model name to record (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_common_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists. Choose another OUT or pass --overwrite.")
    sae = load_foreign(args.src, format=args.format, hook=args.hook)
    if args.model:
        sae.metadata["model"] = {"name": args.model}
    sae.save(out)
    back = load_sae(out)  # read back through the checks every saelab SAE gets
    meta = back.metadata
    cfg = back.cfg
    k = f", k={cfg.k}" if hasattr(cfg, "k") else ""
    print(f"wrote {out} ({meta['imported']['format']} -> saelab {cfg.architecture}, d_in={cfg.d_in}, "
          f"d_sae={cfg.d_sae}{k})")
    print(f"  hook:  {meta.get('hook') or 'unknown: pass --hook NAME to evaluate / interpret / intervene'}")
    print(f"  model: {(meta.get('model') or {}).get('name') or 'unknown'}")
    if meta["imported"]["notes"]:
        print(f"  {len(meta['imported']['notes'])} note(s) above; also kept in {out}/metadata.json (imported.notes)")
    return 0
