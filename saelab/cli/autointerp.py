"""`saelab autointerp`: explain SAE features with a language model and score the explanations.

    saelab autointerp SAE_DIR --data STORE [--features 20 | --feature-ids 3,17,100-199]
                      [--explainer default|rule|MODEL|URL] [--scorer ...] [--api-key-env NAME]
                      [--out DIR] [--dashboard page.html] [--dry-run]

Results go to OUT (default SAE_DIR/autointerp): autointerp.json plus one JSON per feature; a rerun
with the same settings resumes. `saelab dashboard ... --autointerp OUT` shows them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from saelab.cli.common import add_common_flags
from saelab.cli.interpret import _split_words, parse_feature_list
from saelab.config import add_dataclass_args, build_config, parse_int
from saelab.errors import UsageError

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add `autointerp` to the `saelab` parser."""
    from saelab.interpret.autointerp import AutointerpConfig

    p = sub.add_parser("autointerp", help="explain features with a language model; score the explanations",
                       description="Explain each feature from its top and quantile examples (activating tokens "
                                   "marked), then score the explanation by detection (active vs silent "
                                   "excerpts) and fuzzing (right vs wrong marks), each beside a baseline of "
                                   "explanations shuffled between features. Results are cached per feature "
                                   "and a rerun resumes.")
    p.add_argument("words", nargs="*", metavar="SAE_DIR", help="the SAE directory (or pass --sae)")
    p.add_argument("--sae", default=None, help="SAE directory (alias --sae_path; instead of the positional)")
    p.add_argument("--data", default=None, help="activation store the SAE was trained on (alias --data_dir)")
    p.add_argument("--hook", default=None, help="hook point (default: the one recorded in the SAE)")
    p.add_argument("--model", default=None, help="tokenizer of the store's model (default: the one store.json names)")
    p.add_argument("--features", default="20",
                   help="N: that many live features drawn at random (seed --seed); default 20")
    p.add_argument("--feature-ids", dest="feature_ids", default=None,
                   help="explicit ids/ranges such as 3,17,100-199 (instead of --features)")
    p.add_argument("--out", default=None, help="output directory (default: SAE_DIR/autointerp)")
    p.add_argument("--dashboard", default=None, help="also write a dashboard of these features to this HTML file")
    p.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="where feature statistics are cached (default: SAELAB_HOME/interpret)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the prompts for the first feature and stop (no model is loaded)")
    add_dataclass_args(p, AutointerpConfig, title="autointerp")
    add_common_flags(p)
    p.set_defaults(func=_autointerp)


def _choose(args, stats, d_sae: int, seed: int) -> list[int]:
    if args.feature_ids is not None:
        return parse_feature_list(args.feature_ids + ",", d_sae)  # the comma: "5" is id 5, not "first 5"
    try:
        n = parse_int(args.features)
    except ValueError:
        raise UsageError(f"--features {args.features!r}: expected a number (use --feature-ids for ids).") from None
    live = (stats.count_F > 0).nonzero().flatten().numpy()
    if n < 1:
        raise UsageError(f"--features must be >= 1, got {n}.")
    pick = np.random.default_rng(seed).choice(live, size=min(n, live.size), replace=False)
    return sorted(int(f) for f in pick)


def _autointerp(args) -> int:
    from saelab.interpret import PassConfig, check_pair, load_or_compute_stats, load_store_tokenizer
    from saelab.interpret.autointerp import AutointerpConfig, format_prompts, format_summary, run_autointerp
    from saelab.interpret.build import build_dashboard
    from saelab.saes import load_sae
    from saelab.store import load_store

    _, sae_dir = _split_words(args, ())
    cfg = build_config(AutointerpConfig, args, source="autointerp flags")
    sae, store = load_sae(sae_dir), load_store(args.data)
    hook = check_pair(sae, store, args.hook)
    res = load_or_compute_stats(sae, store, hook, PassConfig(top_k=max(20, cfg.n_top)), sae_dir=sae_dir,
                                cache_dir=args.cache_dir, quiet=args.quiet)
    feats = _choose(args, res.stats, sae.cfg.d_sae, cfg.seed)
    if args.model:
        from saelab.models import load_tokenizer

        tok = load_tokenizer(args.model)
    else:
        tok = load_store_tokenizer(store)
    out = Path(args.out) if args.out else Path(sae_dir) / "autointerp"
    ai = run_autointerp(sae, store, hook, res.stats, feats, cfg, out, sae_dir=sae_dir, tokenizer=tok,
                        quiet=args.quiet, dry_run=args.dry_run)
    if args.dry_run:
        print(format_prompts(ai.prompts))
        print(f"\n(dry run: {len(feats)} feature(s) would be explained; nothing was sent or written)")
        return 0
    print(format_summary(ai))
    print(f"\nresults: {out / 'autointerp.json'} (one JSON per feature in {out / 'features'})")
    if args.dashboard:
        page = build_dashboard(sae, store, hook, res, sorted(ai.records), args.dashboard, tokenizer=tok,
                               title="saelab autointerp", sae_name=Path(sae_dir).name, autointerp=ai.records)
        print(f"dashboard: {page}")
    return 0
