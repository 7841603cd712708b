"""`saelab import`: turn an SAE trained by another library into a saelab SAE directory.

    saelab import [--format saelens] SRC OUT [--hook NAME] [--model SPEC] [--overwrite]

OUT then holds cfg.json, model.safetensors and metadata.json like any `saelab train` output, so
evaluate, interpret, dashboard, intervene and circuits take it. With --model the model is loaded once:
the hook must exist in it with width d_in, and its identity (sha256) is recorded, so the tools can
check later that they run the SAE on the model it belongs to. The conversion itself (and every
convention it maps) is in saelab/saes/formats/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from saelab.cli.common import add_common_flags
from saelab.errors import UsageError
from saelab.models import list_hook_points, load_model, resolve_hooks
from saelab.saes import SAE, load_sae
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
    p.add_argument("--model", default=None,
                   help="model the SAE belongs to (spec as in `saelab collect`): checks the hook and its width, "
                        "records the model's identity")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_common_flags(p)
    p.set_defaults(func=_run)


def check_on_model(sae: SAE, spec: str, quiet: bool = False) -> dict:
    """Load model `spec`; check the SAE's hook exists there with width d_in; return the model's info.

    Raises:
        UsageError: the hook is not in the model (with the valid range), or its width is not d_in.
    """
    loaded = load_model(spec, quiet=quiet)
    hook = sae.metadata.get("hook")
    if hook is None:
        raise UsageError("the SAE's hook point is unknown, so it cannot be checked against the model; "
                         "pass --hook NAME (see `saelab hooks --model M`).")
    hp = resolve_hooks(loaded.model, [hook])[0]
    width = dict(list_hook_points(loaded)).get(hp.name)
    if width is not None and width != sae.cfg.d_in:
        raise UsageError(f"hook {hp.name!r} of model {loaded.info.get('name')} has width {width}, but the SAE has "
                         f"d_in={sae.cfg.d_in}. Pass the model the SAE was trained on, or the right --hook.")
    return loaded.info


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists. Choose another OUT or pass --overwrite.")
    sae = load_foreign(args.src, format=args.format, hook=args.hook)
    if args.model:
        sae.metadata["model"] = check_on_model(sae, args.model, quiet=args.quiet)
    sae.save(out)
    back = load_sae(out)  # read back through the checks every saelab SAE gets
    meta, cfg = back.metadata, back.cfg
    k = f", k={cfg.k}" if hasattr(cfg, "k") else ""
    model = (meta.get("model") or {}).get("name")
    print(f"wrote {out} ({meta['imported']['format']} -> saelab {cfg.architecture}, d_in={cfg.d_in}, "
          f"d_sae={cfg.d_sae}{k})")
    print(f"  hook:  {meta.get('hook') or 'unknown: pass --hook NAME to evaluate / interpret / intervene'}")
    print(f"  model: {model + ' (checked)' if model else (meta['imported'].get('model') or 'unknown') + ' (not checked: pass --model)'}")
    if meta["imported"]["notes"]:
        print(f"  {len(meta['imported']['notes'])} note(s) above; also kept in {out}/metadata.json (imported.notes)")
    return 0
