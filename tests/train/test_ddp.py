"""DDP on CPU: `torchrun --nproc_per_node=2 -m saelab train` (gloo) against one process with the
same global batch. Each rank reads a disjoint half of the chunks, gradients are averaged, rank 0
saves; the two runs see the same tokens in a different order, so they end close, not equal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.store.synthetic import make_synthetic_store

REPO = Path(__file__).resolve().parents[2]


def _args(store: Path, out: Path, batch: int) -> list[str]:
    return ["train", "--data", str(store), "--out", str(out), "--quiet", "--batch-size", str(batch),
            "--tokens", str(128 * 60), "--expansion-factor", "2", "--k", "4", "--eval-every", "0", "--eval-tokens", "4096",
            "--checkpoint-every", "20", "--warmup-steps", "5", "--init-tokens", "1024", "--shuffle-chunks", "2",
            "--val-fraction", "0.2", "--lr", "3e-3", "--log-every", "10"]


def test_two_process_ddp_matches_single_process(tmp_path):
    store = make_synthetic_store(tmp_path / "s", d_in=16, n_tokens=24 * 512, chunk_tokens=512, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", "-m", "saelab", *_args(store, tmp_path / "ddp", 64)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "saelab", *_args(store, tmp_path / "one", 128)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    def final(run: str) -> dict:
        return json.loads((tmp_path / run / "final" / "metadata.json").read_text())

    d, s = final("ddp"), final("one")
    # same global batch (2 x 64 = 128): the same number of optimizer steps and tokens
    assert d["step"] == s["step"] == 60
    rows = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == d["step"] * 128
    first_fvu = next(r["fvu"] for r in rows if "fvu" in r)
    assert d["metrics"]["val_fvu"] < 0.8 * first_fvu  # it trained
    assert d["metrics"]["val_fvu"] == pytest.approx(s["metrics"]["val_fvu"], rel=0.15)
    assert d["metrics"]["val_l0"] == pytest.approx(4)
    assert not list((tmp_path / "ddp").glob("*.tmp"))  # only rank 0 wrote, and completely

    # resume the 2-process run from its step-40 checkpoint: each rank gets its own data position back
    ckpt = json.loads((tmp_path / "ddp" / "step_000040" / "state" / "trainer.json").read_text())
    assert len(ckpt["data"]) == 2 and ckpt["data"][0]["chunks"] != ckpt["data"][1]["chunks"]
    first = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            "-m", "saelab", *[x for x in _args(store, tmp_path / "ddp", 64) if x != "--quiet"], "--resume"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step_000040 at step 40" in again.stderr
    second = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for k in first:
        assert torch.equal(first[k], second[k]), k
