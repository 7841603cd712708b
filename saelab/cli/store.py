"""`saelab verify` and `saelab monitor`: check a finished store, watch one being collected."""
from __future__ import annotations

import time

from saelab.cli.common import add_common_flags


def register(sub) -> None:
    """Add `verify` and `monitor` to the `saelab` parser."""
    p = sub.add_parser("verify", help="check every chunk of one or more stores (sha256, shapes, NaN/inf, token ids)",
                       description="Check every chunk file of each store against its manifest. Exit 0 when all "
                                   "are sound, 1 naming each bad file.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="store directories or URLs (s3://bucket/run)")
    p.add_argument("--no-hash", dest="check_hash", action="store_false",
                   help="skip sha256 (sizes, shapes and values are still checked)")
    p.add_argument("--rebuild-manifest", action="store_true",
                   help="first rebuild the manifest of each shard that has chunk files but lost its manifest "
                        "(every chunk is checked; nothing is written if one fails), then verify")
    add_common_flags(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("monitor", help="per-shard progress of a collection: tokens, %%, tokens/s, ETA, disk",
                       description="Show each shard's tokens done / target, chunks, tokens/s, ETA and disk use.")
    p.add_argument("dir", metavar="DIR", help="store directory or URL (s3://bucket/run)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="refresh every SECONDS until every shard is done (Ctrl-C stops)")
    add_common_flags(p)
    p.set_defaults(func=_monitor)


def _verify(args) -> int:
    from saelab.store.check import render_verify, verify_store
    from saelab.store.rebuild import rebuild_manifests, render_rebuild

    bad = 0
    for i, d in enumerate(args.dirs):
        if args.rebuild_manifest:
            rebuilt = rebuild_manifests(d)
            print(("\n" if i else "") + render_rebuild(rebuilt))
            if not rebuilt.ok:
                bad += 1
                continue
        report = verify_store(d, check_hash=args.check_hash)
        print(("\n" if i else "") + render_verify(report))
        bad += not report.ok
    return 1 if bad else 0


def _monitor(args) -> int:
    from saelab.store.check import monitor_snapshot, render_monitor

    while True:
        statuses = monitor_snapshot(args.dir)
        text = render_monitor(args.dir, statuses)
        if args.watch:
            print("\033[2J\033[H" + text, flush=True)
        else:
            print(text)
        if not args.watch or all(s.state == "done" for s in statuses):
            return 0
        time.sleep(args.watch)
