"""Training under faults (issue 20): an --out that holds a run or sits in a store, NaN in the validation
split, damaged or foreign checkpoint files, unknown versions, bad numbers, too little memory, no CUDA,
and a moved run folder. Tiny synthetic stores; each run is a fraction of a second to a few seconds."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.errors import DataError, UsageError
from saelab.store.synthetic import make_synthetic_store
from saelab.train import TrainConfig, train
from saelab.train import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """8 chunks x 256 tokens, d_in 8, planted features."""
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "s", d_in=8, n_tokens=2048, chunk_tokens=256, seed=0)


def tiny_cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(store), out=str(out), batch_size=64, tokens=64 * 12, expansion_factor=[2], k=[2],
                eval_every=4, eval_tokens=256, checkpoint_every=4, keep_checkpoints=0, warmup_steps=2,
                init_tokens=256, log_every=4, shuffle_chunks=2, val_fraction=0.25, lr=3e-3, dead_window=4)
    base.update(kw)
    return TrainConfig(**base)


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(store), "--out", str(out), "--quiet", "--batch-size", "64", "--tokens", "768",
            "--expansion-factor", "2", "--k", "2", "--eval-every", "4", "--eval-tokens", "256",
            "--checkpoint-every", "4", "--warmup-steps", "2", "--init-tokens", "256", "--shuffle-chunks", "2",
            "--val-fraction", "0.25", *extra]


# ------------------------------------------------------------------ data loss


def test_training_into_an_existing_run_is_refused_unless_resume_or_overwrite(store, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(store, out), quiet=True)
    kept = {p.name for p in out.iterdir()}
    best = weights(out / "sae_best")
    other = tiny_cfg(store, out, expansion_factor=[3], seed=1)
    with pytest.raises(UsageError) as e:
        train(other, quiet=True)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert {p.name for p in out.iterdir()} == kept and same(weights(out / "sae_best"), best), "the old run changed"
    assert main(_train_args(store, out, "--expansion-factor", "3")) == 2
    assert "--overwrite" in capsys.readouterr().err

    res = train(dataclasses.replace(other, overwrite=True), quiet=True)
    assert res.best_dir == out / "sae_best" and weights(out / "sae_best")["W_dec_FD"].shape == (24, 8)
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    steps = sorted(p.name for p in out.glob("step_*"))
    assert steps and all(json.loads((out / s / "state" / "trainer.json").read_text())["config"]["seed"] == 1
                         for s in steps), "a checkpoint of the old run survived --overwrite"
    with pytest.raises(UsageError, match="give one of them"):
        tiny_cfg(store, out, resume=True, overwrite=True)


def test_resume_without_a_checkpoint_starts_again_only_with_the_same_config(store, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(store, out, checkpoint_every=0), quiet=True)  # finished, no step checkpoint
    with pytest.raises(UsageError, match=r"no step_NNNNNN/ checkpoint.*\n  - seed"):
        train(tiny_cfg(store, out, checkpoint_every=0, seed=5, resume=True), quiet=True)
    res = train(tiny_cfg(store, out, checkpoint_every=0, resume=True), quiet=True)  # same config: a clean restart
    assert res.resumed_from == 0 and res.steps == 12


def test_output_inside_a_store_is_refused(store, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    for out in (copy / "shard_00000" / "run", copy / "run", copy):
        with pytest.raises(UsageError, match=rf"inside the activation store {copy}"):
            train(tiny_cfg(copy, out), quiet=True)
    assert not (copy / "shard_00000" / "run").exists() and not (copy / "run").exists()
    from saelab.store.check import verify_store
    assert verify_store(copy).ok


# ------------------------------------------------------------------ silent wrong results


def test_nan_in_the_validation_split_stops_the_run_before_training(tmp_path):
    root = make_synthetic_store(tmp_path / "s", d_in=8, n_tokens=2048, chunk_tokens=256, seed=2)
    from saelab.store import load_store

    st = load_store(root)
    val = st.split_chunks(0.25, 0)[1][0]
    f = root / "shard_00000" / val.files["model.layers.0"]["file"]
    x = np.load(f)
    x[3, 2] = np.nan
    np.save(f, x)
    m = json.loads((root / "shard_00000" / "manifest.json").read_text())
    from saelab.atomic import sha256_file
    for c in m["chunks"]:
        if c["index"] == val.index:
            c["files"]["model.layers.0"].update(sha256=sha256_file(f), bytes=f.stat().st_size)
    (root / "shard_00000" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError, match=r"validation split .* NaN/inf.*nothing was trained"):
        train(tiny_cfg(root, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "step_000004").exists()


def _cut_run(store: Path, out: Path, monkeypatch, stop: int = 8) -> TrainConfig:
    """Train until the checkpoint at `stop` is written, then 'crash'; returns the config to resume."""
    from saelab.train import loop

    real = ck.write_training_checkpoint

    class Crash(Exception):
        pass

    def crash_after(o, runs, step, *a, **kw):
        path = real(o, runs, step, *a, **kw)
        if step == stop:
            raise Crash
        return path

    cfg = tiny_cfg(store, out)
    monkeypatch.setattr(loop.ck, "write_training_checkpoint", crash_after)
    with pytest.raises(Crash):
        train(cfg, quiet=True)
    monkeypatch.setattr(loop.ck, "write_training_checkpoint", real)
    return dataclasses.replace(cfg, resume=True)


def test_every_checkpoint_file_has_a_checksum(store, tmp_path, monkeypatch):
    _cut_run(store, tmp_path / "run", monkeypatch)
    ckpt = tmp_path / "run" / "step_000008"
    listed = json.loads((ckpt / "state" / "checksums.json").read_text())["sha256"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "checksums.json"}
    assert set(listed) == on_disk and {"state/optimizer.safetensors", "state/trainer.json",
                                       "state/module.safetensors", "model.safetensors"} <= on_disk
    assert ck.checkpoint_problems(ckpt) == []


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(store, tmp_path, monkeypatch, caplog):
    full = train(tiny_cfg(store, tmp_path / "full"), quiet=True)
    cfg = _cut_run(store, tmp_path / "cut", monkeypatch)
    opt = tmp_path / "cut" / "step_000008" / "state" / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in Adam's state: loads fine, resumes wrong
    opt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        res = train(cfg, quiet=True)
    assert res.resumed_from == 4
    text = caplog.text
    assert "step_000008 is damaged" in text and "optimizer.safetensors fails its sha256" in text
    assert "resuming from" in text and "step_000004" in text
    assert same(weights(res.final_dir), weights(full.final_dir)), "the fallback did not resume exactly"


def test_no_intact_checkpoint_is_a_data_error_naming_each(store, tmp_path, monkeypatch, capsys):
    cfg = _cut_run(store, tmp_path / "cut", monkeypatch)
    for step in (4, 8):
        p = tmp_path / "cut" / ck.step_dir_name(step) / "state" / "module.safetensors"
        p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(DataError) as e:
        train(cfg, quiet=True)
    assert "step_000004" in str(e.value) and "step_000008" in str(e.value) and "--overwrite" in str(e.value)
    assert main(_train_args(store, tmp_path / "cut", "--resume")) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_trainer_state_version_is_refused(store, tmp_path, monkeypatch):
    cfg = _cut_run(store, tmp_path / "cut", monkeypatch)
    ckpt = tmp_path / "cut" / "step_000008"
    tj = ckpt / "state" / "trainer.json"
    tj.write_text(json.dumps({**json.loads(tj.read_text()), "format_version": 99}))
    ck.write_checksums(ckpt)  # a consistent file from a newer saelab, not damage
    with pytest.raises(UsageError, match=r"trainer.json has format_version 99.*Upgrade saelab"):
        train(cfg, quiet=True)


@pytest.mark.parametrize("content", [b"\x80\x04\x95 a pickle, not safetensors", b"garbage" * 10])
def test_a_foreign_checkpoint_safetensors_is_named(store, tmp_path, monkeypatch, content):
    cfg = _cut_run(store, tmp_path / "cut", monkeypatch)
    for step in (4, 8):  # both replaced, with consistent checksums: only the file's content is wrong
        ckpt = tmp_path / "cut" / ck.step_dir_name(step)
        (ckpt / "state" / "optimizer.safetensors").write_bytes(content)
        ck.write_checksums(ckpt)
    with pytest.raises(DataError, match=r"step_000008/state/optimizer.safetensors is not a readable safetensors"):
        train(cfg, quiet=True)


def test_moved_run_folder_resumes(store, tmp_path, monkeypatch):
    full = train(tiny_cfg(store, tmp_path / "full"), quiet=True)
    cfg = _cut_run(store, tmp_path / "cut", monkeypatch)
    shutil.move(tmp_path / "cut", tmp_path / "moved")
    res = train(dataclasses.replace(cfg, out=str(tmp_path / "moved")), quiet=True)
    assert res.resumed_from == 8
    assert same(weights(res.final_dir), weights(full.final_dir))


# ------------------------------------------------------------------ messages instead of tracebacks


def test_object_dtype_chunk_read_by_train_exits_1_naming_the_file(tmp_path, capsys):
    from saelab.atomic import sha256_file

    root = make_synthetic_store(tmp_path / "s", d_in=8, n_tokens=2048, chunk_tokens=256, seed=4)
    sdir = root / "shard_00000"
    m = json.loads((sdir / "manifest.json").read_text())
    for c in m["chunks"]:  # every chunk, so the first one train reads is foreign
        f = sdir / c["files"]["model.layers.0"]["file"]
        np.save(f, np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
        c["files"]["model.layers.0"].update(sha256=sha256_file(f), bytes=f.stat().st_size)
    (sdir / "manifest.json").write_text(json.dumps(m))
    assert main(_train_args(root, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "not a plain .npy array" in err and "chunk_0000" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--lr", "--l1-coeff"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_learning_rate_or_coefficient_is_a_usage_error(store, tmp_path, capsys, flag, value):
    rc = main(_train_args(store, tmp_path / "run", "--architecture", "relu", flag, value))
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag[2:].replace('-', '_')} must be a finite number, got {value}" in err
    assert not (tmp_path / "run").exists()


def test_sae_options_must_be_finite():
    from saelab.saes import ReLUConfig

    with pytest.raises(UsageError, match="l1_coeff must be a finite number"):
        ReLUConfig(d_in=4, d_sae=8, l1_coeff=float("nan"))


def test_d_sae_too_large_is_refused_before_allocating(store, tmp_path, capsys):
    rc = main(_train_args(store, tmp_path / "run", "--d-sae", str(10**12)))
    err = capsys.readouterr().err
    assert rc == 2 and "GiB" in err and "free" in err and "--d-sae" in err and "Traceback" not in err
    from saelab.saes import TopKConfig
    from saelab.train.memory import check_memory, sae_bytes

    c = TopKConfig(d_in=576, d_sae=1152, k=8)
    need = sae_bytes(576, 1152, 4096)
    assert need == 4 * 4 * (2 * 576 * 1152 + 1152 + 576) + 4 * 4096 * (3 * 1152 + 3 * 576)
    assert check_memory([c], 4096, torch.device("cpu"), available=need) == need
    with pytest.raises(UsageError, match=r"needs about .* MiB .* but only .* MiB is free"):
        check_memory([c], 4096, torch.device("cpu"), available=need - 1)
    act = 4 * 4096 * (3 * 1152 + 3 * 576)  # a sweep's SAEs step one after another: one batch of activations
    assert check_memory([c, c], 4096, torch.device("cpu"), available=2 * need) == 2 * need - act


def test_device_cuda_without_cuda_is_a_usage_error(store, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(_train_args(store, tmp_path / "run", "--device", "cuda"))
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "--device cpu" in err and "Traceback" not in err
    assert main(_train_args(store, tmp_path / "run", "--device", "gpu")) == 2
    assert "is not a device" in capsys.readouterr().err


def test_evaluating_on_nan_validation_rows_is_refused():
    from saelab.train.validation import evaluate_sae
    from tests.builders import identity_sae

    x_BD = torch.ones(4, 3)
    x_BD[1, 2] = float("inf")
    with pytest.raises(UsageError, match="validation batch has 1 NaN/inf values"):
        evaluate_sae(identity_sae(3), [torch.ones(2, 3), x_BD], torch.device("cpu"))


def test_overwrite_deletes_only_the_runs_own_files(store, tmp_path):
    out = tmp_path / "runs"
    train(tiny_cfg(store, out / "sweep", k=[2, 3]), quiet=True)  # members topk_k2_x2, topk_k3_x2
    train(tiny_cfg(store, out / "single"), quiet=True)
    (out / "sweep" / "notes.txt").write_text("mine")
    (out / "sweep" / "topk_k2_x2" / "plot.png").write_bytes(b"mine")
    # --out runs/ is not a run (no runs/config.json): the runs below it are not its members
    res = train(tiny_cfg(store, out, checkpoint_every=0), quiet=True)
    assert res.best_dir == out / "sae_best" and (out / "single" / "sae_best").is_dir()
    res = train(tiny_cfg(store, out / "sweep", overwrite=True, checkpoint_every=0), quiet=True)
    left = sorted(str(p.relative_to(out / "sweep")) for p in (out / "sweep").rglob("*") if "tb" not in p.parts)
    assert "notes.txt" in left and "topk_k2_x2/plot.png" in left
    assert not (out / "sweep" / "topk_k3_x2").exists() and not (out / "sweep" / "topk_k2_x2" / "sae_best").exists()
    assert (out / "sweep" / "sae_best").is_dir() and (out / "single" / "sae_best").is_dir()


def test_eval_only_on_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from tests.builders import identity_sae

    identity_sae(4).save(tmp_path / "sae")
    assert main(["train", "--eval-only", "--load-checkpoint", str(tmp_path / "sae"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "Traceback" not in err
