"""Resumable training checkpoints: optimizer state as safetensors, trainer state as JSON, atomic dirs.

Owns `RunState` (one SAE of a sweep with its optimizer, dead-latent counters and best
validation loss) and the on-disk form of everything the training loop needs to continue a killed run bit-for-bit, and the
atomic-directory discipline (write `step_000500.tmp/`, fsync, `os.replace` to `step_000500/`;
the helpers live in saelab/atomic.py, shared with `SAE.save`).
It knows no SAE architecture and no store: it moves tensors, dicts and directories.

Layout of a training checkpoint (one directory per step, written atomically):

    OUT/step_000500/
      state/trainer.json               step, RNG states, data-iterator state, best val, config
      state/checksums.json             sha256 of every other file of the checkpoint (written last)
      <sae>/cfg.json, model.safetensors, metadata.json     `sae.save` output (usable as-is)
      <sae>/state/module.safetensors   the SAE's raw training-time state_dict (normalisation not
                                       folded in), so a resumed run continues from identical bits
      <sae>/state/optimizer.safetensors  Adam state, flattened (below) + dead-latent counters

`<sae>` is `.` for a single SAE (so `step_000500/` is itself a loadable SAE directory) and the run
name (`topk_k32_x8`) in a sweep.

Flattening an optimizer state_dict `{"state": {i: {name: tensor}}, "param_groups": [...]}`:

    tensor "state.<i>.<name>"   for every tensor entry   (Adam: step, exp_avg, exp_avg_sq)
    metadata["param_groups"]  = JSON of param_groups    (lr, betas, eps, ... and param indices)
    metadata["scalars"]       = JSON of non-tensor state entries

No pickle anywhere: RNG states are stored as base64 of their byte tensors.

Resume (`intact_checkpoint`) takes the newest step directory whose files all match
state/checksums.json; a damaged newer one is skipped with a warning naming the file, and with none
intact the error lists each. A checkpoint from before checksums existed is used with a warning.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from saelab.atomic import commit_dir, fresh_tmp, sha256_file
from saelab.config import to_dict
from saelab.errors import DataError, UsageError, raise_all
from saelab.train.schedule import DeadTracker

log = logging.getLogger(__name__)

STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE_VERSION = 1
RESUME_FREE = ("resume", "quick_test", "wandb", "log_every", "num_workers", "device", "out", "overwrite",
               "prefetch_chunks")
"""TrainConfig fields that may differ between a run and its resumption (`out`: a run folder may move)."""
CHECKSUMS_JSON = "checksums.json"
CHECKSUMS_VERSION = 1


@dataclass
class RunState:
    """One SAE of a training sweep and everything a checkpoint must keep to continue it exactly."""

    name: str
    """Run name, e.g. topk_k32_x8."""
    sae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dead: DeadTracker
    """Steps since each latent last fired."""
    run_dir: Path
    """Where sae_best/, final/ and metrics go: OUT for a single SAE, OUT/<name> in a sweep."""
    rel: str
    """Its place inside a step checkpoint: '.' for a single SAE, else its name."""
    sink: Any = None
    """Its metric sink (saelab.train.sinks)."""
    best_val: float = math.inf
    """Lowest validation loss so far (that of sae_best/)."""
    last_val: dict = field(default_factory=dict)
    """The most recent validation metrics."""


def step_dir_name(step: int) -> str:
    """`step_000500`: zero-padded so directory listings sort by step."""
    return f"step_{step:06d}"


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split an optimizer state_dict into named tensors and JSON metadata (see module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write `optimizer.state_dict()` (+ `extra` tensors, stored under `extra.<name>`) as safetensors."""
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    for name, t in (extra or {}).items():
        tensors[f"extra.{name}"] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata=meta)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a checkpoint's safetensors file; a damaged or foreign file
    (a pickle, garbage, a truncated copy) is a DataError that names it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the checkpoint is incomplete. Resume from another step_NNNNNN/ "
                        "or start a new --out.") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e}): the checkpoint is damaged. Resume "
                        "from another step_NNNNNN/ (move this one away) or start a new --out.") from None


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, torch.Tensor]:
    """Restore an optimizer from `save_optimizer` output; returns the `extra` tensors by name."""
    tensors, meta = read_safetensors(path)
    if "param_groups" not in meta:
        raise UsageError(f"{path} is not a saelab optimizer state (no param_groups in its header). "
                         "Resume from a directory written by `saelab train`.")
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("state.")}
    optimizer.load_state_dict(unflatten_optimizer_state(optim, meta))
    return extra


def save_module_state(module: torch.nn.Module, path: Path) -> None:
    """The raw state_dict (parameters and buffers, exactly as trained) as safetensors."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def load_module_state(module: torch.nn.Module, path: Path) -> None:
    state, _ = read_safetensors(path)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{path} does not match the SAE being resumed: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}. Resume with the same architecture flags.")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON-safe values."""
    np_state = np.random.get_state()
    out = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def latest_checkpoint(out: Path) -> Path | None:
    """The complete `step_NNNNNN/` with the highest step under `out` (ignores `*.tmp`), or None."""
    if not out.is_dir():
        return None
    steps = []
    for p in out.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir() and (p / "state" / "trainer.json").is_file():
            steps.append((int(m.group(1)), p))
    return max(steps)[1] if steps else None


def write_checksums(ckpt: Path) -> None:
    """state/checksums.json: sha256 of every file under `ckpt` (itself excluded), by relative path."""
    files = {str(p.relative_to(ckpt)): sha256_file(p) for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS_JSON}
    write_json(ckpt / "state" / CHECKSUMS_JSON, {"format_version": CHECKSUMS_VERSION, "sha256": files})


def checkpoint_problems(ckpt: Path) -> list[str] | None:
    """What is wrong with a step checkpoint's files ([] when every sha256 matches); None when it
    predates checksums (no state/checksums.json and nothing else to go by)."""
    path = ckpt / "state" / CHECKSUMS_JSON
    if not path.is_file():
        return None
    try:
        listed = json.loads(path.read_text())
        files = listed["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{path} is unreadable ({e})"]
    if not isinstance(listed.get("format_version"), int) or listed["format_version"] > CHECKSUMS_VERSION:
        return [f"{path} has format_version {listed.get('format_version')!r}; this saelab reads up to {CHECKSUMS_VERSION}"]
    problems = []
    for rel, digest in files.items():
        p = ckpt / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p} fails its sha256 (changed or damaged after it was written)")
    for p in sorted(ckpt.rglob("*")):
        rel = str(p.relative_to(ckpt))
        if p.is_file() and p.name != CHECKSUMS_JSON and rel not in files:
            problems.append(f"{p} is not listed in {path}")
    return problems


def intact_checkpoint(out: Path) -> Path | None:
    """The newest step checkpoint under `out` whose files all match their checksums, or None if there
    is no checkpoint. Damaged newer ones are skipped with a warning that names them.

    Raises:
        DataError: there are checkpoints, and every one is damaged (each problem listed).
    """
    if not out.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in out.iterdir()
                    if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()), reverse=True)
    damaged: list[str] = []
    for _, ckpt in steps:
        problems = checkpoint_problems(ckpt)
        if problems is None:
            if (ckpt / "state" / "trainer.json").is_file():
                log.warning("%s has no state/%s (written by an older saelab): its files cannot be checked",
                            ckpt, CHECKSUMS_JSON)
                return _fallen_back(ckpt, damaged)
            problems = [f"{ckpt / 'state' / 'trainer.json'} is missing"]
        if not problems:
            return _fallen_back(ckpt, damaged)
        damaged.append(f"{ckpt.name}: " + "; ".join(problems))
        log.warning("checkpoint %s is damaged and is skipped: %s", ckpt, "; ".join(problems))
    if damaged:
        raise DataError(f"--resume: every checkpoint under {out} is damaged:\n  - " + "\n  - ".join(damaged)
                        + "\n  Nothing can be resumed exactly. Start again with --overwrite, or a new --out.")
    return None


def _fallen_back(ckpt: Path, damaged: list[str]) -> Path:
    if damaged:
        log.warning("resuming from %s, an older checkpoint than the damaged %s", ckpt,
                    ", ".join(d.split(":")[0] for d in damaged))
    return ckpt


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "state" / "trainer.json"
    if not path.is_file():
        raise UsageError(f"{ckpt} is not a resumable checkpoint: {path} is missing. "
                         "Resume points are the step_NNNNNN/ directories `saelab train` writes.")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}): the checkpoint is damaged.") from None
    version = data.get("format_version", 0)
    if version > TRAINER_STATE_VERSION:
        raise UsageError(f"{path} has format_version {version}; this saelab reads up to "
                         f"{TRAINER_STATE_VERSION}. Upgrade saelab to resume this run.")
    return data


def config_diff(old_config: dict[str, Any], cfg) -> list[str]:
    """'field: checkpoint X, now Y' for every TrainConfig field outside RESUME_FREE that differs."""
    old = {k: v for k, v in old_config.items() if k not in RESUME_FREE}
    new = {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE}
    defaults = to_dict(type(cfg)())  # a key an older checkpoint lacks counts as its default value
    return [f"{k}: checkpoint {old.get(k, defaults.get(k))!r}, now {new[k]!r}" for k in sorted(new)
            if old.get(k, defaults.get(k)) != new[k]]


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` step directories (keep <= 0 keeps everything)."""
    if keep <= 0 or not out.is_dir():
        return
    steps = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := STEP_DIR_RE.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Whole-sweep training checkpoints


def save_sae(run: RunState, directory: Path, cfg, src, step: int, metrics: dict) -> None:
    meta = {"training": to_dict(cfg), "hook": src.hook, "model": src.meta.get("model"),
            "store": src.path, "step": step, "metrics": metrics, "run": run.name,
            "norms": src.norms}  # the store's median row norm: splices leave rows far above it alone
    mined_F = getattr(run.sae, "init_from_dirs_F", None)
    if mined_F is not None:  # --init rkcnn: which latents started at mined directions (also in the weights)
        meta["mined_latents"] = mined_F.nonzero().flatten().tolist()
    run.sae.save(directory, metadata=meta)


def gather_json(obj: Any, world: int) -> list[Any]:
    """Every rank's JSON-safe `obj`, in rank order (sent as UTF-8 bytes: no pickle on the wire)."""
    if world == 1:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(data.numel()))
    padded = torch.zeros(int(max(sizes)), dtype=torch.uint8)
    padded[: data.numel()] = data
    full = [torch.zeros(int(max(sizes)), dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(full, padded)
    return [json.loads(bytes(f[: int(n)].tolist()).decode()) for f, n in zip(full, sizes)]


def write_training_checkpoint(out: Path, runs: list[RunState], step: int, tokens: int, data_states: list[dict],
                      cfg, src) -> Path:
    final = out / step_dir_name(step)
    tmp = fresh_tmp(final)
    for run in runs:
        d = tmp / run.rel
        if run.rel != ".":
            save_sae(run, d, cfg, src, step, run.last_val)
        else:  # sae.save replaces its directory: save into a side dir and move the files up
            save_sae(run, tmp / "_sae", cfg, src, step, run.last_val)
            for f in (tmp / "_sae").iterdir():
                f.rename(tmp / f.name)
            (tmp / "_sae").rmdir()
        (d / "state").mkdir(parents=True, exist_ok=True)
        save_module_state(run.sae, d / "state" / "module.safetensors")
        save_optimizer(run.optimizer, d / "state" / "optimizer.safetensors",
                          extra={"steps_since_fired_F": run.dead.steps_since_fired_F})
    write_json(tmp / "state" / "trainer.json", {
        "format_version": TRAINER_STATE_VERSION, "step": step, "tokens": tokens,
        "rng": rng_state(), "data": data_states, "config": to_dict(cfg),
        "scheduler": {"step": step, "lr": runs[0].optimizer.param_groups[0]["lr"]},
        "runs": {r.name: {"best_val": r.best_val, "last_val": r.last_val} for r in runs},
    })
    write_checksums(tmp)
    commit_dir(tmp, final)
    prune_checkpoints(out, cfg.keep_checkpoints)
    log.info("checkpoint %s", final)
    return final


def restore_training_checkpoint(ckpt: Path, runs: list[RunState], data_it, cfg, rank: int, world: int) -> tuple[int, int]:
    """Load weights, optimizer, dead counters, best val, data position and RNG; returns (step, tokens)."""
    state = read_trainer_state(ckpt)
    raise_all(config_diff(state["config"], cfg),
              f"--resume from {ckpt} with a different config (use the original settings or a new --out)")
    for run in runs:
        d = ckpt / run.rel / "state"
        load_module_state(run.sae, d / "module.safetensors")
        extra = load_optimizer(run.optimizer, d / "optimizer.safetensors")
        run.dead.steps_since_fired_F = extra["steps_since_fired_F"].clone()
        saved = state["runs"][run.name]
        run.best_val, run.last_val = saved["best_val"], saved["last_val"]
    if len(state["data"]) != world:
        raise UsageError(f"{ckpt} was written by {len(state['data'])} process(es); resume it with the same "
                         f"number (this run has {world}), or start a new --out.")
    data_it.load_state_dict(state["data"][rank])
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return int(state["step"]), int(state["tokens"])
