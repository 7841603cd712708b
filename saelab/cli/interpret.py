"""`saelab interpret {stats,feature}` and `saelab dashboard`: read what an SAE's features mean.

    saelab interpret stats SAE_DIR --data STORE            top 20 by max / by frequency, dead count,
                                                           all stats to CSV + JSON
    saelab interpret feature SAE_DIR --data STORE --feature 12 --top-k 20 [--context 10] [--model M]
    saelab dashboard SAE_DIR --data STORE --out dashboard.html [--features N|ids] [--top-k 10]

Kimi-K2 recipe spellings work (FLAG_ALIASES): `--sae_path` (= --sae, instead of SAE_DIR),
`--data_dir`, `--num_shards` (first N shards), `--statistics`, `--feature_id`, `--top_k`;
`saelab interpret --sae_path S --data_dir D --statistics` and `... --feature_id 5` pick the action
from the flags. All commands share one cached statistics pass (see saelab.interpret.data).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

from saelab.cli.common import add_common_flags
from saelab.config import add_dataclass_args, build_config, parse_int
from saelab.errors import UsageError

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add `interpret` and `dashboard` to the `saelab` parser."""
    from saelab.interpret.stats import PassConfig

    p = sub.add_parser("interpret", help="feature statistics and top-activating examples of an SAE",
                       description="`interpret stats SAE_DIR --data STORE`: per-feature statistics. "
                                   "`interpret feature SAE_DIR --data STORE --feature ID`: one feature's "
                                   "top activations with context (and logit lens with --model).")
    p.add_argument("words", nargs="*", metavar="{stats,feature} SAE_DIR",
                   help="the action (stats or feature; inferred from --statistics / --feature when left out) "
                        "and the SAE directory (or pass --sae)")
    _common(p)
    p.add_argument("--feature", type=parse_int, default=None, help="feature id for `interpret feature`")
    p.add_argument("--top-k", dest="top_k", type=parse_int, default=20, help="examples to show (default: 20)")
    p.add_argument("--context", type=parse_int, default=10, help="tokens of context either side (default: 10)")
    p.add_argument("--statistics", action="store_true", help="print feature statistics (the `stats` action)")
    p.add_argument("--out", default=None, help="stats: directory for feature_stats.csv/.json (default: SAE_DIR)")
    p.add_argument("--rows", type=parse_int, default=20, help="stats: rows in each printed table (default: 20)")
    add_dataclass_args(p, PassConfig, exclude=("top_k",), title="statistics pass")
    add_common_flags(p)
    p.set_defaults(func=_interpret)

    p = sub.add_parser("dashboard", help="one self-contained HTML page to browse every feature",
                       description="Write a single HTML file (no network needed) with a searchable, sortable "
                                   "feature list and, per feature, statistics, histogram, logit lens and "
                                   "examples as token heatmaps.")
    p.add_argument("words", nargs="*", metavar="SAE_DIR", help="the SAE directory (or pass --sae)")
    _common(p)
    p.add_argument("--out", default="dashboard.html", help="the HTML file to write (default: dashboard.html)")
    p.add_argument("--features", default=None,
                   help="N (features 0..N-1) or ids/ranges like 3,17,100-199 (default: all)")
    p.add_argument("--top-k", dest="top_k", type=parse_int, default=10, help="top examples per feature (default: 10)")
    p.add_argument("--context", type=parse_int, default=8, help="tokens of context either side (default: 8)")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--autointerp", default=None, metavar="DIR",
                   help="show explanations and scores from this `saelab autointerp` output directory")
    add_dataclass_args(p, PassConfig, exclude=("top_k",), title="statistics pass")
    add_common_flags(p)
    p.set_defaults(func=_dashboard)


def _common(p) -> None:
    p.add_argument("--sae", default=None, help="SAE directory (alias --sae_path; instead of the positional)")
    p.add_argument("--data", default=None, required=False, help="activation store directory or URL (alias --data_dir)")
    p.add_argument("--hook", default=None, help="hook point (default: the one recorded in the SAE)")
    p.add_argument("--num-shards", dest="num_shards", type=parse_int, default=None,
                   help="use only the first N shards of the store (alias --num_shards)")
    p.add_argument("--model", default=None, help="model (spec as in `saelab collect`): logit lens and tokenizer")
    p.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="where statistics are cached (default: SAELAB_HOME/interpret)")
    p.add_argument("--recompute", action="store_true", help="ignore cached statistics")
    p.add_argument("--bands", type=parse_int, default=4, help="activation-quantile bands (default: 4)")
    p.add_argument("--per-band", dest="per_band", type=parse_int, default=2,
                   help="examples per quantile band (default: 2)")


def _split_words(args, actions: tuple[str, ...]) -> tuple[str | None, str]:
    words = list(args.words)
    action = words.pop(0) if words and words[0] in actions else None
    if len(words) > 1:
        raise UsageError(f"expected one SAE directory, got {' '.join(words)}.")
    sae_dir = words[0] if words else args.sae
    if words and args.sae and words[0] != args.sae:
        raise UsageError(f"two SAE directories given: {words[0]} and --sae {args.sae}; pass one.")
    if sae_dir is None:
        raise UsageError("no SAE directory: pass it as SAE_DIR or with --sae (alias --sae_path).")
    if args.data is None:
        raise UsageError("no store: pass --data STORE (alias --data_dir), the store the SAE reads.")
    return action, sae_dir


def _open(args, sae_dir: str, top_k: int):
    """(sae, store, hook, StatsResult) with the statistics pass keeping at least top_k examples."""
    from saelab.interpret.data import check_pair, load_or_compute_stats
    from saelab.interpret.stats import PassConfig
    from saelab.saes import load_sae
    from saelab.store import load_store

    sae = load_sae(sae_dir)
    store = load_store(args.data)
    if args.num_shards is not None:
        if args.num_shards < 1:
            raise UsageError(f"--num-shards must be >= 1, got {args.num_shards}.")
        n = min(args.num_shards, store.meta["num_shards"])
        store = store.subset(list(range(n)))
    hook = check_pair(sae, store, args.hook)
    # the pass keeps max(default, requested) examples, so `feature` and `dashboard` share one cache
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "top_k"})
    cfg = build_config(PassConfig, flags)
    cfg.top_k = max(cfg.top_k, top_k)
    res = load_or_compute_stats(sae, store, hook, cfg, sae_dir=sae_dir, cache_dir=args.cache_dir,
                                recompute=args.recompute, quiet=args.quiet)
    return sae, store, hook, res


def _tokenizer_and_model(args, store):
    from saelab.interpret.examples import load_store_tokenizer

    if args.model:
        from saelab.models import load_model

        lm = load_model(args.model, quiet=args.quiet)
        return lm.tokenizer, lm.model
    return load_store_tokenizer(store), None


def _interpret(args) -> int:
    action, sae_dir = _split_words(args, ("stats", "feature"))
    if action is None:
        action = "feature" if args.feature is not None else "stats" if args.statistics else None
    if action is None:
        raise UsageError("say what to show: `interpret stats SAE_DIR --data STORE` (or --statistics), or "
                         "`interpret feature SAE_DIR --data STORE --feature ID` (or --feature_id ID).")
    if action == "feature" and args.feature is None:
        raise UsageError("`interpret feature` needs --feature ID (alias --feature_id).")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}.")
    if action == "feature":
        from saelab.interpret.data import check_feature_ids
        from saelab.saes import read_cfg

        cfg, _ = read_cfg(sae_dir)  # fail on a bad id before the (possibly long) pass
        check_feature_ids([args.feature], cfg.d_sae)
    sae, store, hook, res = _open(args, sae_dir, args.top_k)
    if action == "stats" or args.statistics:
        _print_stats(res, args, sae_dir)
    if action == "feature":
        _print_feature(sae, store, hook, res, args)
    return 0


def _stats_rows(stats) -> list[dict]:
    freq, mean = stats.frequency_F.tolist(), stats.mean_F.tolist()
    mx, cnt = stats.max_F.tolist(), stats.count_F.tolist()
    return [{"feature": f, "frequency": freq[f], "count": cnt[f], "mean": mean[f], "max": mx[f],
             "dead": cnt[f] == 0} for f in range(stats.d_sae)]


def _print_stats(res, args, sae_dir: str) -> None:
    stats = res.stats
    rows = _stats_rows(stats)
    dead = sum(r["dead"] for r in rows)
    print(f"{stats.d_sae} features on {stats.num_tokens:,} tokens ({res.meta['hook']}); "
          f"dead (never fired): {dead} ({100 * dead / stats.d_sae:.1f}%)")
    for title, key in (("by max activation", "max"), ("by firing frequency", "frequency")):
        print(f"\ntop {args.rows} {title}:")
        print(f"{'feature':>8} {'max':>10} {'mean':>10} {'frequency':>10}")
        for r in sorted(rows, key=lambda r: (-r[key], r["feature"]))[:args.rows]:
            print(f"{r['feature']:>8} {r['max']:>10.4g} {r['mean']:>10.4g} {r['frequency']:>10.3%}")
    out = Path(args.out) if args.out else Path(sae_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "feature_stats.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    info = {k: res.meta.get(k) for k in ("hook", "store", "store_id", "sae_sha256", "num_tokens", "d_sae")}
    (out / "feature_stats.json").write_text(json.dumps(dict(info, dead=dead, features=rows), indent=1) + "\n")
    print(f"\nall {stats.d_sae} features: {out / 'feature_stats.csv'} and {out / 'feature_stats.json'}")


def _show(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


def _print_feature(sae, store, hook, res, args) -> None:
    from saelab.interpret.examples import feature_examples, model_logit_lens, token_texts
    from saelab.interpret.stats import quantile_examples

    f, stats = args.feature, res.stats
    bands = quantile_examples(stats, args.bands, args.per_band)
    ex = feature_examples(sae, store, hook, stats, [f], args.top_k, bands, args.context)[f]
    tok, model = _tokenizer_and_model(args, store)
    ids = {i for e in ex["top"] + [e for b in ex["quant"] for e in b] for i in e.context_ids}
    lens = model_logit_lens(model, sae.W_dec_FD[f:f + 1], k=10) if model is not None else None
    if lens is not None:
        ids |= set(lens.top_ids_FK[0].tolist()) | set(lens.bottom_ids_FK[0].tolist())
    texts = token_texts(tok, ids)
    print(f"feature {f}: frequency {float(stats.frequency_F[f]):.4%} ({int(stats.count_F[f])} of "
          f"{stats.num_tokens:,} tokens), max {float(stats.max_F[f]):.4g}, mean when active "
          f"{float(stats.mean_F[f]):.4g}")
    if not ex["top"]:
        print("  the feature never fired on this store (dead).")

    def line(rank, e):
        ctx = "".join((f"[[{texts[t]}]]" if i == e.center else texts[t]) for i, t in enumerate(e.context_ids))
        return (f"{rank:>4} {e.value:>9.4g} {e.index:>10} {e.token_id:>7} {_show(repr(texts[e.token_id])):<16} "
                f"{_show(ctx)}")

    if ex["top"]:
        print(f"\ntop {len(ex['top'])} activations:\n{'#':>4} {'act':>9} {'index':>10} {'id':>7} {'token':<16} context")
        for r, e in enumerate(ex["top"], 1):
            print(line(r, e))
    for b, band in enumerate(ex["quant"]):
        if band:
            lo, hi = bands.edges_FQ2[f, b].tolist()
            print(f"\nquantile band {b + 1}/{len(ex['quant'])} (sampled activations {lo:.4g} .. {hi:.4g}):")
            for r, e in enumerate(band, 1):
                print(line(r, e))
    if lens is not None:
        for name, i_K, v_K in (("promoted", lens.top_ids_FK[0], lens.top_values_FK[0]),
                               ("suppressed", lens.bottom_ids_FK[0], lens.bottom_values_FK[0])):
            print(f"\nlogit lens, {name}: " + ", ".join(f"{texts[i]!r} {v:+.3g}" for i, v in zip(i_K.tolist(), v_K.tolist())))


def parse_feature_list(spec: str | None, d_sae: int) -> list[int]:
    """`None` -> all; `N` -> 0..N-1; `3,17,100-199` -> those ids (checked against d_sae)."""
    from saelab.interpret.data import check_feature_ids

    if spec is None:
        return list(range(d_sae))
    spec = spec.strip()
    try:
        if "," not in spec and "-" not in spec:
            return list(range(min(parse_int(spec), d_sae)))
        ids: list[int] = []
        for part in filter(None, (s.strip() for s in spec.split(","))):
            if "-" in part:
                a, b = part.split("-", 1)
                ids += range(parse_int(a), parse_int(b) + 1)
            else:
                ids.append(parse_int(part))
    except ValueError:
        raise UsageError(f"--features {spec!r}: expected N or ids/ranges such as 3,17,100-199.") from None
    return sorted(set(check_feature_ids(ids, d_sae)))


def _dashboard(args) -> int:
    from saelab.interpret.build import build_dashboard
    from saelab.saes import read_cfg

    _, sae_dir = _split_words(args, ())
    cfg, _ = read_cfg(sae_dir)
    feats = parse_feature_list(args.features, cfg.d_sae)
    sae, store, hook, res = _open(args, sae_dir, args.top_k)
    tok, model = _tokenizer_and_model(args, store)
    ai = None
    if args.autointerp:
        from saelab.interpret.autointerp import load_results

        ai = load_results(args.autointerp)
    path = build_dashboard(sae, store, hook, res, feats, args.out, top_k=args.top_k, context=args.context,
                           bands=args.bands, per_band=args.per_band, tokenizer=tok, model=model,
                           title=args.title or "saelab dashboard", sae_name=Path(sae_dir).name, autointerp=ai)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(feats)} features)")
    return 0
