"""Per-feature JSON records of an autointerp run: written atomically after each step, read back on resume.

Layout of an output directory:

    OUT/autointerp.json              the run: key, settings (never an API key), backends, summary, timings
    OUT/features/feature_00012.json  one feature: explanation, judged items and scores, shuffled baseline

A record is written to `*.tmp`, fsync'd and renamed, so a run killed at any moment leaves only
whole records; a record whose `key` differs from the run's (another SAE, store or settings) or that
cannot be read is ignored and recomputed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from saelab.errors import UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def write_json(path: Path, obj: dict) -> None:
    """tmp + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, allow_nan=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def record_path(out: Path, feature: int) -> Path:
    return Path(out) / "features" / f"feature_{feature:05d}.json"


def load_record(out: Path, feature: int, key: str) -> dict:
    """The feature's record of this run ({} when missing, unreadable or from another run)."""
    p = record_path(out, feature)
    if not p.is_file():
        return {}
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable record %s (%s); recomputing it", p, e)
        return {}
    if rec.get("key") != key or rec.get("feature") != feature:
        log.warning("ignoring %s: it belongs to another SAE, store or settings; recomputing it", p)
        return {}
    if rec.get("format_version", 0) > FORMAT_VERSION:
        raise UsageError(f"{p} has format_version {rec['format_version']}; this saelab reads <= {FORMAT_VERSION}. "
                         "Upgrade saelab or write to another --out.")
    return rec


def save_record(out: Path, rec: dict) -> None:
    write_json(record_path(out, rec["feature"]), dict(rec, format_version=FORMAT_VERSION))


def load_results(out: str | Path) -> dict[int, dict]:
    """feature -> record, for every record listed in OUT/autointerp.json (what the dashboard shows).

    Raises:
        UsageError: no autointerp.json in `out`.
    """
    out = Path(out)
    summary = out / "autointerp.json"
    if not summary.is_file():
        raise UsageError(f"{out} holds no autointerp results (no autointerp.json). Run `saelab autointerp "
                         f"SAE_DIR --data STORE --out {out}` first.")
    run = json.loads(summary.read_text(encoding="utf-8"))
    res = {}
    for f in run.get("features", []):
        rec = load_record(out, int(f), run.get("key"))
        if rec:
            res[int(f)] = rec
    return res
