"""Where a training run may write: checks on --out made before anything is written.

    OUT inside an activation store (OUT or a parent holds store.json)   -> refused
    OUT holds a previous run (step_NNNNNN/, sae_best/, final/, ...)      -> refused, unless
        --resume     continue it from its newest intact checkpoint (a different config is refused);
                     with no checkpoint yet, start it again if OUT/config.json matches, or
        --overwrite  delete the previous run's files (only those saelab writes) and start again

A previous run is recognised by the files `train` writes (RUN_FILES, step checkpoints) at OUT, and
one level down in directories named like a sweep member (`topk_k32_x8`) when OUT/config.json marks
OUT as a run; other files and directories (e.g. other runs under a shared `runs/`) are never touched.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from saelab.errors import UsageError
from saelab.store import STORE_JSON
from saelab.train.checkpoint import STEP_DIR_RE, config_diff

log = logging.getLogger(__name__)

RUN_FILES = ("sae_best", "final", "config.json", "metrics.jsonl", "tb", "training_curves.png")
"""What a run writes into OUT (or OUT/<name>/ for a member of a sweep), besides step checkpoints."""
MEMBER_RE = re.compile(r"^[a-z]+(_k\d+)?_x[\d.]+$")
"""Names `sae_configs` gives the members of a sweep: architecture, k, expansion (topk_k32_x8)."""


def enclosing_store(out: Path) -> Path | None:
    """The activation store `out` would sit in (itself or a parent holding store.json), or None."""
    for p in (out, *out.parents):
        if (p / STORE_JSON).is_file():
            return p
    return None


def _is_run_file(p: Path) -> bool:
    name = p.name.removesuffix(".tmp").removesuffix(".old")
    return name in RUN_FILES or bool(STEP_DIR_RE.match(name))


def previous_run(out: Path) -> list[Path]:
    """saelab's files of an earlier run in `out`: its own and those of sweep members one level down."""
    if not out.is_dir():
        return []
    found, is_run = [], (out / "config.json").is_file()
    for p in sorted(out.iterdir()):
        if _is_run_file(p):
            found.append(p)
        elif is_run and MEMBER_RE.match(p.name) and p.is_dir() and not p.is_symlink():
            found += [q for q in sorted(p.iterdir()) if q.name in RUN_FILES and q.name != "config.json"]
    return found


def check_out_dir(cfg, has_checkpoint: bool) -> list[Path]:
    """Refuse an --out inside a store, or one holding a run that neither --resume nor --overwrite claims.

    Args:
        cfg: the TrainConfig (out, resume, overwrite).
        has_checkpoint: --resume found an intact step checkpoint under OUT.
    Returns:
        the previous run's files that `clear_previous_run` should delete (only with --overwrite).
    Raises:
        UsageError: naming the store, or naming --resume and --overwrite.
    """
    out, resume, overwrite = Path(cfg.out), cfg.resume, cfg.overwrite
    store = enclosing_store(out.resolve())
    if store is not None:
        raise UsageError(f"--out {out} is inside the activation store {store}. A store's directories belong to its "
                         "writers, and `saelab verify` would report the run's files as damage. Choose an --out "
                         f"outside {store} (e.g. runs/NAME).")
    old = previous_run(out)
    if not old or (resume and has_checkpoint):
        return []
    shown = ", ".join(str(p.relative_to(out)) for p in old[:5]) + (", ..." if len(old) > 5 else "")
    if resume:  # killed before its first checkpoint: the same config may start again
        diff = _config_diff_of(out, cfg)
        if not diff:
            return old
        raise UsageError(f"--resume: {out} holds a run ({shown}) with no step_NNNNNN/ checkpoint to continue from, "
                         "and its config.json differs from this run's:\n  - " + "\n  - ".join(diff)
                         + "\n  Pass --overwrite (without --resume) to replace it, or choose another --out.")
    if not overwrite:
        raise UsageError(f"--out {out} already holds a training run ({shown}). Pass --resume to continue it, "
                         "--overwrite to delete it and start again, or choose another --out.")
    return old


def _config_diff_of(out: Path, cfg) -> list[str]:
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return [f"{out / 'config.json'} is missing or unreadable"]
    return config_diff(old, cfg)


def clear_previous_run(out: Path, old: list[Path]) -> None:
    """Delete the files `check_out_dir` found (--overwrite), and sweep directories left empty."""
    parents = set()
    for p in old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        if p.parent != out:
            parents.add(p.parent)
    for d in parents:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    if old:
        log.warning("--overwrite: deleted the previous run in %s (%d entries)", out, len(old))
