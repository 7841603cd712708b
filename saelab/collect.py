"""Collect activations: run a model over a corpus and write hook-point activations to a store.

Owns the loop `corpus -> packed sequences -> forward batches -> chunks`; the on-disk format,
atomic writes and resume bookkeeping belong to `saelab.store`, model loading and hooks to
`saelab.models`, reading and packing text to `saelab.corpus`.

Sharding and the batch grid:
    sequence i of the packed corpus belongs to shard  i mod num_shards
    shard s cuts its own sequences into forward batches of `batch_size`
    a chunk closes after the batch that brings it to >= chunk_tokens stored rows
So a chunk always ends on a batch boundary; a resumed run skips `batches_done * batch_size` of the
shard's sequences and recomputes exactly the batches an uninterrupted run would have, which makes
the finished store byte-identical to an uninterrupted one.

Which positions are stored: every position of a packed sequence except BOS and padding (their
activations are huge outliers), unless `keep_special`. fp16 overflow is clamped and counted.

Launchers: `--parallel P` starts P local writers itself; under torchrun (RANK and WORLD_SIZE in the
environment) every rank is one writer, shard = RANK of num_shards = WORLD_SIZE, and `--device cuda`
means cuda:LOCAL_RANK (one model copy per GPU). A model that needs several GPUs per copy runs one
rank per node (`--nproc-per-node 1`) with `--device auto` (accelerate's device map over the node's
GPUs). Either way the store equals the one hand-started `--shard r --num-shards W` writers give.

Deliberately left out: the store format (store.py), any communication between writers (they share
nothing but the output directory), and streaming to training (train.py reads models directly).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saelab import __version__
from saelab.config import group, grouped, to_dict
from saelab.corpus import PACKING_RULE, CorpusConfig, batch_sequences, open_corpus, pack_corpus
from saelab.errors import UsageError
from saelab.models import ModelConfig, capture, layer_hook, load_model_from, resolve_hooks, tokenizer_info
from saelab.models.lora import default_store_name, join_lora_specs, slices_json
from saelab.store import ShardWriter, hook_key
from saelab.store.lock import preflight
from saelab.store.writer import raise_tokens_target
from saelab.store.check import verify_store
from saelab.store.format import OUTLIER_RATIO, shard_target
from saelab.store.remote import RemotePath, location

log = logging.getLogger(__name__)



@grouped
@dataclass
class CollectConfig:
    """Everything `saelab collect` needs; field name = flag = YAML key."""
    lm: ModelConfig = group(ModelConfig)
    """The model (--model --dtype --device --adapter)."""
    text: CorpusConfig = group(CorpusConfig, corpus="sotu", max_length=1024)
    """The corpus and its packing (--corpus --text-field --text-template --max-length --keep-special)."""
    out: str | None = None
    """Store directory (default: data/run, or data/lora_<adapter initials> such as data/lora_gudqkvo for a
    lora: hook), or a URL on object storage (s3://bucket/run, gs://...; needs the s3 or gcs extra).
    Re-running the same command into it resumes; other settings are refused."""
    layer: list[int] = field(default_factory=list)
    """Residual stream after these decoder layers (shorthand for --hook model.layers.N); comma-separated."""
    hook: list[str] = field(default_factory=list)
    """Hook points by module path with optional :input/:output, comma-separated (see `saelab hooks`)."""
    tokens: int = 1_000_000
    """Activations to store in total over all shards (accepts 10M, 500k)."""
    chunk_tokens: int = 65_536
    """Rows per chunk file (a chunk closes on the batch that reaches this). The train/val split is by
    chunk, so a store needs two chunks to train on: 64k rows lets a 100k-token store have both."""
    batch_size: int = 8
    """Sequences (not tokens, unlike train's --batch-size) per forward pass."""
    shard: int = 0
    """This writer's shard index, 0 .. num_shards-1."""
    num_shards: int = 1
    """Writers sharing the corpus (processes, GPUs or machines on a shared disk)."""
    parallel: int = 1
    """Start this many local writer processes (one per shard) and wait for them."""
    verify: bool = False
    """Verify the whole store (sha256, NaN/inf, shapes) when collection ends."""
    outlier_ratio: float = OUTLIER_RATIO
    """Flag a stored row whose norm exceeds this many times the running median row norm (massive
    activations); train, evaluate and splices leave flagged rows out unless --keep-outliers."""

    def __post_init__(self):
        self.hook = join_lora_specs(self.hook)  # --hook lora:gate,up,... arrives split on its commas
        if self.out is None:
            self.out = f"data/{default_store_name(self.hook) or 'run'}"
        problems = []
        if not self.outlier_ratio > 1:
            problems.append(f"--outlier-ratio must be > 1 (a multiple of the median row norm), got {self.outlier_ratio}")
        for name in ("tokens", "chunk_tokens", "batch_size", "num_shards", "parallel"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.shard < max(self.num_shards, 1):
            problems.append(f"--shard {self.shard} is outside 0 .. {self.num_shards - 1} (--num-shards {self.num_shards})")
        if self.parallel > 1 and self.num_shards not in (1, self.parallel):
            problems.append("--parallel P starts shards 0..P-1 itself: leave --num-shards out or set it to P")
        if problems:
            raise UsageError("collect settings have problems:\n" + "\n".join(f"  - {p}" for p in problems))

    def hook_names(self) -> list[str]:
        names = [layer_hook(i) for i in self.layer] + list(self.hook)
        return list(dict.fromkeys(names)) or [layer_hook(15)]


@dataclass
class CollectResult:
    """What a collect run did."""
    out: Path | RemotePath
    """The store directory (or its object-storage location)."""
    tokens: int
    """Rows stored by this shard (all of them, resumed or not)."""
    chunks: int
    """Chunk files of this shard per hook."""
    seconds: float
    """Wall time of this invocation."""
    tokens_per_second: float
    """Rows stored per second during this invocation (model + store)."""
    overflow: int
    """Activations clamped to the fp16 range."""


def run_meta(cfg: CollectConfig, loaded, hook_points, widths, corpus) -> dict:
    """The store-level manifest for this run (store.json)."""
    lora = [h for h in hook_points if hasattr(h, "slices")]
    return {
        "saelab_version": __version__,
        "model": {k: loaded.info.get(k) for k in ("spec", "name", "sha256", "architecture", "num_layers", "d_model")},
        "hooks": [{"name": h.name, "width": widths[h.name], "key": hook_key(h.name)} for h in hook_points],
        "dtype": "float16",
        # named after the model, not the tokenizer's path (a cache path differs between machines)
        "tokenizer": dict(tokenizer_info(loaded.tokenizer), name=loaded.info.get("name")),
        "corpus": {"spec": corpus.name, "fingerprint": corpus.fingerprint,
                   "shuffle_documents": cfg.text.shuffle_documents,
                   "document_seed": cfg.text.document_seed if cfg.text.shuffle_documents else None},
        "packing": PACKING_RULE,
        "outlier_ratio": cfg.outlier_ratio,
        "max_length": cfg.text.max_length,
        "keep_special": cfg.text.keep_special,
        "batch_size": cfg.batch_size,
        "chunk_tokens": cfg.chunk_tokens,
        "tokens_target": cfg.tokens,
        "num_shards": cfg.num_shards,
        "adapter": loaded.info.get("adapter"),
        # LoRA hooks: hook name -> coordinate map [{layer, type, module, rank, start, stop}, ...]
        **({"slices": {h.name: slices_json(h) for h in lora}} if lora else {}),
    }


def from_launcher(cfg: CollectConfig, env=os.environ) -> CollectConfig:
    """cfg with shard = RANK, num_shards = WORLD_SIZE and --device cuda -> cuda:LOCAL_RANK when torchrun
    (or any launcher setting RANK and WORLD_SIZE) started this process; cfg itself otherwise.

    Raises:
        UsageError: --shard/--num-shards contradicting the launcher, --parallel under it, or
            --device auto with several ranks per node (each would spread itself over every GPU).
    """
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in env:
        return cfg
    rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    problems = []
    if cfg.parallel > 1:
        problems.append("--parallel starts its own writers, but torchrun already makes every rank one writer: "
                        "drop --parallel")
    if (cfg.shard, cfg.num_shards) not in ((0, 1), (rank, world)):
        problems.append(f"--shard {cfg.shard} --num-shards {cfg.num_shards} contradict torchrun's RANK {rank} "
                        f"WORLD_SIZE {world}: leave both out (rank r writes shard r of WORLD_SIZE)")
    if cfg.lm.device == "auto" and int(env.get("LOCAL_WORLD_SIZE", "1")) > 1:
        problems.append("--device auto spreads one model copy over all GPUs of the node, so run one rank per "
                        "node (--nproc-per-node 1); for one GPU per rank use --device cuda")
    if problems:
        raise UsageError("collect under torchrun:\n" + "\n".join(f"  - {p}" for p in problems))
    device = f"cuda:{local}" if cfg.lm.device == "cuda" else cfg.lm.device
    return dataclasses.replace(cfg, shard=rank, num_shards=world, lm=dataclasses.replace(cfg.lm, device=device))


def collect(cfg: CollectConfig, quiet: bool = False) -> CollectResult:
    """Run one writer (shard `cfg.shard` of `cfg.num_shards`, or the launcher's rank: `from_launcher`)
    to completion; resume if possible."""
    cfg = from_launcher(cfg)
    if cfg.parallel > 1:
        return collect_parallel(cfg, quiet=quiet)

    t_start = time.perf_counter()
    preflight(cfg.out, cfg.shard)  # what needs no model fails before the model loads
    corpus = open_corpus(cfg.text)
    loaded = load_model_from(cfg.lm, quiet=quiet)
    model, tok = loaded.model, loaded.tokenizer
    hook_points = resolve_hooks(model, cfg.hook_names())
    widths = _hook_widths(model, hook_points)
    meta = run_meta(cfg, loaded, hook_points, widths, corpus)
    writer = ShardWriter.open(cfg.out, meta, shard=cfg.shard, num_shards=cfg.num_shards)
    target = shard_target(cfg.tokens, cfg.shard, cfg.num_shards)
    if writer.tokens_done >= target:
        log.info("shard %d of %s is already complete (%s tokens)", cfg.shard, cfg.out, f"{writer.tokens_done:,}")
        writer.finish()
        return CollectResult(location(cfg.out), writer.tokens_done, writer.chunks_done, 0.0, 0.0, 0)
    if writer.done:  # complete at a smaller --tokens: grow it on the same batch grid
        log.warning("shard %d of %s was complete at %s tokens; collecting on to the new --tokens %s", cfg.shard,
                    cfg.out, f"{writer.tokens_done:,}", f"{cfg.tokens:,}")
        writer.reopen_short_last_chunk_(cfg.chunk_tokens)
    raise_tokens_target(cfg.out, cfg.tokens)

    tokz = meta["tokenizer"]  # bos/eos/pad ids
    packed = pack_corpus(corpus, tok, tokz, cfg.text)
    mine = (s for s in packed if s.index % cfg.num_shards == cfg.shard)
    # resume on the batch grid: skip the sequences of the batches already stored
    batches = batch_sequences(itertools.islice(mine, writer.batches_done * cfg.batch_size, None), cfg.batch_size)
    if writer.batches_done:
        log.info("resuming shard %d at batch %d (%s tokens already stored)", cfg.shard, writer.batches_done,
                 f"{writer.tokens_done:,}")

    device = next(model.parameters()).device
    tokens_done, batches_done, overflow_total, new_tokens = writer.tokens_done, writer.batches_done, 0, 0
    chunk = None
    bar = tqdm(total=target, initial=min(tokens_done, target), unit="tok", unit_scale=True,
               desc=f"collect shard {cfg.shard}", disable=quiet, dynamic_ncols=True)
    t0 = time.perf_counter()

    def close_chunk():
        nonlocal chunk, overflow_total
        entry = chunk.commit(sequences_done=batches_done * cfg.batch_size, batches_done=batches_done)
        overflow_total += sum(entry.overflow.values())
        chunk = None

    try:
        for ids_BS, mask_BS, keep_BS, seq_idx_B in batches:
            acts = capture(model, hook_points, ids_BS.to(device), mask_BS.to(device), stop_early=True)
            rows_b, rows_s = keep_BS.nonzero(as_tuple=True)
            chunk = chunk or writer.begin_chunk()
            chunk.append(
                ids_BS[rows_b, rows_s].numpy().astype(np.int32),
                np.stack([seq_idx_B[rows_b.numpy()], rows_s.numpy()], 1).astype(np.int32),
                {name: a[rows_b.to(a.device), rows_s.to(a.device)] for name, a in acts.items()},
            )
            batches_done += 1
            n = len(rows_b)
            tokens_done += n
            new_tokens += n
            bar.update(min(n, max(0, target - bar.n)))
            if chunk.num_tokens >= cfg.chunk_tokens or tokens_done >= target:
                close_chunk()
            if tokens_done >= target:
                break
        else:
            if chunk is not None:
                close_chunk()
            log.warning("corpus %s ran out after %s tokens for shard %d (target %s)", corpus.name,
                        f"{tokens_done:,}", cfg.shard, f"{target:,}")
        writer.finish()
    finally:
        if chunk is not None:
            chunk.abort()
        writer.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    result = CollectResult(location(cfg.out), tokens_done, writer.chunks_done, time.perf_counter() - t_start,
                           new_tokens / elapsed if elapsed > 0 else 0.0, overflow_total)
    if cfg.verify:
        _verify_when_all_done(cfg)
    return result


def _verify_when_all_done(cfg: CollectConfig) -> None:
    """Verify the store; under a launcher, rank 0 does it once every rank has finished (gloo barrier)."""
    if cfg.num_shards == 1 or "RANK" not in os.environ:
        _verify_or_raise(cfg.out)
        return
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
        if dist.get_rank() == 0:
            _verify_or_raise(cfg.out)
    finally:
        if started:
            dist.destroy_process_group()


def _hook_widths(model, hook_points) -> dict[str, int]:
    """Width of each hook's activation, from one forward pass on two tokens."""
    device = next(model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    acts = capture(model, hook_points, ids, torch.ones_like(ids), stop_early=True)
    return {name: int(a.shape[-1]) for name, a in acts.items()}


def _verify_or_raise(path) -> None:
    report = verify_store(path)
    if report.problems:
        raise UsageError(f"verify found {len(report.problems)} problem(s) in {path}:\n"
                         + "\n".join(f"  - {p}" for p in report.problems))
    log.info("verify: %s is sound", path)


def collect_parallel(cfg: CollectConfig, quiet: bool = False) -> CollectResult:
    """Start `cfg.parallel` writer processes (shards 0..P-1) and follow them until all finish."""
    p = cfg.parallel
    threads = max(1, (os.cpu_count() or 1) // p)
    procs = []
    t0 = time.perf_counter()
    for s in range(p):
        child = dataclasses.replace(cfg, shard=s, num_shards=p, parallel=1, verify=False)
        argv = [sys.executable, "-m", "saelab", "collect", "--quiet"]
        for k, v in to_dict(child).items():
            if v is None or v == [] or isinstance(v, bool) and not v:
                continue
            flag = "--" + k.replace("_", "-")
            argv += [flag] if v is True else [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), SAELAB_TORCH_THREADS=str(threads))
        procs.append(subprocess.Popen(argv, env=env))
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc=f"collect x{p}", disable=quiet)
    while any(pr.poll() is None for pr in procs):
        time.sleep(2.0)
        bar.n = _tokens_on_disk(cfg.out)
        bar.refresh()
    bar.n = _tokens_on_disk(cfg.out)
    bar.close()
    failed = [s for s, pr in enumerate(procs) if pr.returncode != 0]
    if failed:
        raise UsageError(f"writer process(es) for shard(s) {failed} failed (see their messages above). "
                         "Re-run the same command to resume; finished shards are kept.")
    if cfg.verify:
        _verify_or_raise(cfg.out)
    elapsed = time.perf_counter() - t0
    total = _tokens_on_disk(cfg.out)
    return CollectResult(location(cfg.out), total, 0, elapsed, total / elapsed if elapsed else 0.0, 0)


def _tokens_on_disk(out) -> int:
    total = 0
    for sdir in sorted(location(out).glob("shard_*")):
        try:
            total += int(json.loads((sdir / "manifest.json").read_text()).get("tokens_done", 0))
        except (OSError, ValueError, UsageError):
            pass
    return total
