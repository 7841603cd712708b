"""rkcnn-arms: known answers for its helpers, step-0 SAE = train's SAE, the seed's λ conversion, dry run."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelab.store.synthetic import make_synthetic_store
from saelab.atomic import claim_file
from saelab.cli import main
from saelab.experiments import rkcnn_arms as ra
from saelab.experiments import rkcnn_compare as rc
from saelab.rkcnn import RkcnnConfig
from saelab.saes import load_sae
from saelab.statistics import mean_std, t_quantile
from saelab.store import load_store
from saelab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "model.layers.3.mlp"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "s", d_in=16, n_tokens=8192,
                                   chunk_tokens=512, seed=0, hook=HOOK)


def test_redundancy_is_mean_max_abs_cos_within_the_group():
    W = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([True, True, True, False])
    # |cos|: (0,1) 0.6, (0,2) 0, (1,2) 0.8 -> row maxima 0.6, 0.8, 0.8
    assert rc.redundancy(W, mask) == pytest.approx((0.6 + 0.8 + 0.8) / 3)
    assert rc.redundancy(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]), torch.tensor([True, True])) == pytest.approx(1.0)
    assert math.isnan(rc.redundancy(W, torch.tensor([True, False, False, False])))


def test_paired_interval_by_hand():
    a, b = [1.0, 2.0, 4.0], [0.5, 1.0, 2.5]
    d = [0.5, 1.0, 1.5]
    ms = mean_std(d)
    got = ra.paired(a, b, 0.95)
    assert got["estimate"] == pytest.approx(1.0) and got["n"] == 3
    assert got["high"] - got["estimate"] == pytest.approx(t_quantile(0.975, 2) * ms.sem)
    assert ra.paired([1.0, math.nan], [0.0, 0.0], 0.95) is None


def test_initial_sae_is_the_sae_train_starts_from(store, tmp_path):
    cfg = ra.Config(data=str(store), hook=HOOK, plan="factorial", seeds=2, steps=1, expansion=4, batch_size=128,
                    eval_tokens=512, init_tokens=1024, val_fraction=0.2).resolved()
    arm = ra.arms_of("factorial")["relu-random-none-10"]
    tcfg = ra.train_config(cfg, str(store), 16, arm, 0, tmp_path / "run", 1.0)
    tcfg = type(tcfg)(**{**tcfg.__dict__, "lr": 1e-12})
    sae0, _ = ra.initial_sae(tcfg)
    trained = load_sae(train(tcfg, quiet=True).final_dir)
    assert torch.equal(sae0.init_from_dirs_F, trained.init_from_dirs_F) and int(sae0.init_from_dirs_F.sum()) == 6
    s = float(sae0.input_scale)  # saved weights are folded: W_dec' = W_dec / s
    torch.testing.assert_close(trained.W_dec_FD * s, sae0.W_dec_FD.detach(), atol=1e-5, rtol=1e-4)


def test_faithful_plan_uses_the_seeds_settings(store, tmp_path):
    cfg = ra.Config(data=str(store), hook=HOOK, plan="faithful").resolved()
    assert (cfg.steps, cfg.expansion, cfg.batch_size, cfg.lr) == (10_000, 8, 256, 1e-3)
    arms = ra.arms_of("faithful")
    t = ra.train_config(cfg, str(store), 16, arms["rkcnn-seed"], 0, tmp_path, input_scale=2.0)
    assert t.l1_coeff == pytest.approx(1e-3 * 16 / 128 * 2.0)  # λ (D / F) s
    assert t.sae_options == {"normalize_decoder": True, "l1_weighted": False, "init_enc_from_dec": False,
                             "b_dec_init": "zeros"}
    assert (t.warmup_steps, t.decay_fraction, t.rkcnn.rkcnn_subsets, t.rkcnn.rkcnn_fraction) == (0, 0.0, 600, 0.5)
    assert t.rkcnn == RkcnnConfig(rkcnn_subsets=600) and t.init == "rkcnn"  # the other defaults are the method's
    # the control: as many random data rows as the method mines, min(0.5 F, h), with its random encoder
    c = ra.train_config(cfg, str(store), 576, arms["data_rows-seed"], 0, tmp_path, input_scale=2.0)
    assert c.init == "data_rows" and round(c.rkcnn.rkcnn_fraction * c.d_sae) == 600 and c.d_sae == 4608
    assert c.rkcnn.rkcnn_init_encoder == "random" and c.sae_options == t.sae_options and c.l1_coeff == pytest.approx(
        1e-3 * 576 / 4608 * 2.0)
    assert ra.train_config(cfg, str(store), 16, arms["data_rows-seed"], 0, tmp_path, 2.0).rkcnn.rkcnn_fraction == 0.5


def test_factorial_has_every_cell():
    arms = ra.arms_of("factorial")
    assert len(arms) == 2 * (1 + 2 * 2 * 2)  # per architecture: baseline + encoder x dedup x fraction
    assert arms["topk-tied-cos_cap-50"]["options"] == {"init_encoder": "tied", "dedup": "cos_cap", "orient": "heavy_tail"}


def test_dead_plan_with_topk_turns_auxk_off(store, tmp_path):
    cfg = ra.Config(data=str(store), hook=HOOK, plan="dead", dead_architecture="topk", expansion=32).resolved()
    arms = ra.arms_of("dead", "topk")
    assert {a["architecture"] for a in arms.values()} == {"topk"} and "baseline-topk" in arms
    assert set(arms) - {"baseline-topk"} == set(ra.arms_of("dead")) - {"baseline-relu"}
    assert arms["rkcnn-tied-cos_cap-10"]["options"] == {"init_encoder": "tied", "dedup": "cos_cap", "orient": "heavy_tail"}
    assert arms["rkcnn-none-10"]["options"] == {"dedup": "none"}  # the method's random encoder by default
    assert arms["pca-tied-10"] == dict(architecture="topk", init="pca", fraction=0.1,
                                       options={"init_encoder": "tied", "orient": "heavy_tail"})
    t = ra.train_config(cfg, str(store), 16, arms["rkcnn-none-10"], 0, tmp_path, input_scale=1.0)
    assert t.sae_options == {"aux_k": 0} and t.k == [32] and t.l1_coeff is None and t.d_sae == 32 * 16


def test_dry_run_writes_results_and_reuses_saved_runs(tmp_path, capsys):
    argv = ["experiment", "rkcnn-arms", "--dry-run", "--plan", "dead", "--arms", "rkcnn-none-10", "--out",
            str(tmp_path), "-q"]
    assert main(argv) == 0
    assert "rkcnn-none-10" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == set(ra.RESULT_KEYS) and set(res["arms"]) == {"baseline-relu", "rkcnn-none-10"}
    assert len(res["per_run"]) == 4 and (tmp_path / "arms.png").read_bytes()[:4] == b"\x89PNG"
    d = res["summary"]["rkcnn-none-10"]["fvu"]["diff"]
    rows = {(r["arm"], r["seed"]): r for r in res["per_run"]}
    diffs = [rows[("rkcnn-none-10", s)]["fvu"] - rows[("baseline-relu", s)]["fvu"] for s in (0, 1)]
    assert d["estimate"] == pytest.approx(sum(diffs) / 2)
    assert all(r["n_mined"] == (0 if r["arm"].startswith("baseline") else round(0.1 * 64)) for r in res["per_run"])
    assert main(argv) == 0  # every run is reused: same rows
    assert json.loads((tmp_path / "results.json").read_text())["per_run"] == res["per_run"]
    assert main(["experiment", "rkcnn-arms", "--dry-run", "--arms", "nope", "--out", str(tmp_path / "x")]) == 2
    # seeds 2-3 in a process of their own (a dry run has 2 seeds); a run over seeds 1-2 then reuses the
    # rows of both processes
    assert main(argv + ["--first-seed", "2"]) == 0
    side = json.loads((tmp_path / "results.json").read_text())["per_run"]
    assert sorted({r["seed"] for r in side}) == [2, 3]
    assert main(argv + ["--first-seed", "1"]) == 0
    both = json.loads((tmp_path / "results.json").read_text())["per_run"]
    assert both == [r for r in res["per_run"] if r["seed"] == 1] + [r for r in side if r["seed"] == 2]


def test_store_pass_counts_dead_latents_and_the_seeds_ev(store):
    cfg = ra.Config(data=str(store), hook=HOOK, plan="factorial", seeds=2, steps=1, expansion=2, batch_size=128,
                    init_tokens=1024).resolved()
    tcfg = ra.train_config(cfg, str(store), 16, ra.arms_of("factorial")["baseline-relu"], 0, Path("/nonexistent"), 1.0)
    sae, _ = ra.initial_sae(tcfg)
    with torch.no_grad():
        sae.b_enc_F[:5] = -1e6  # five latents that can never fire
    sp = ra.store_pass(sae, load_store(str(store)), HOOK, 3000)
    assert sp["tokens"] == 3000 and (sp["count_F"][:5] == 0).all() and (sp["count_F"][5:] > 0).all()
    X = torch.cat([torch.from_numpy(load_store(str(store)).read_activations(c, HOOK).copy()).float()
                   for c in load_store(str(store)).select("all")])[:3000]
    with torch.no_grad():
        x_hat, _ = sae(X)
    want = 1 - (X - x_hat).var(unbiased=False) / X.var(unbiased=False)
    assert sp["ev_seed"] == pytest.approx(float(want), rel=1e-4)


def test_steps_zero_measures_the_initial_sae_only(tmp_path):
    assert main(["experiment", "rkcnn-arms", "--dry-run", "--steps", "0", "--arms", "topk-tied-none-50",
                 "--out", str(tmp_path), "-q"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["per_run"]
    assert rows and all(r["fvu"] == r["fvu_step0"] for r in rows)
    assert not any((tmp_path / "runs" / f"{r['arm']}_s{r['seed']}" / "final").exists() for r in rows)


def test_a_run_resumed_from_its_checkpoint_gives_the_uninterrupted_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ra, "CHECKPOINT_EVERY", 5)  # a dry run's 20 steps: checkpoints at 5, 10, 15
    argv = ["experiment", "rkcnn-arms", "--dry-run", "--plan", "faithful", "--seeds", "2", "-q"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = {(r["arm"], r["seed"]): r for r in json.loads((tmp_path / "whole" / "results.json").read_text())["per_run"]}
    assert main(argv + ["--out", str(tmp_path / "cut")]) == 0
    run = tmp_path / "cut" / "runs" / "rkcnn-seed_s1"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000010", "step_000015"]
    # killed after its step-15 checkpoint: no row, no final SAE
    (run / "row.json").unlink()
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert main(argv[:-1] + ["--out", str(tmp_path / "cut")]) == 0  # without -q: the log is on stderr
    assert f"resumed from {run / 'step_000015'} at step 15" in capsys.readouterr().err
    cut = {(r["arm"], r["seed"]): r for r in json.loads((tmp_path / "cut" / "results.json").read_text())["per_run"]}
    drop = ("seconds",)
    assert {k: {m: v for m, v in r.items() if m not in drop} for k, r in cut.items()} == \
        {k: {m: v for m, v in r.items() if m not in drop} for k, r in whole.items()}


def test_claims_split_runs_between_live_processes(tmp_path):
    path = tmp_path / "a_s0.claim"
    assert claim_file(path) and claim_file(path)  # ours, and ours again
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        assert not claim_file(path)  # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert claim_file(path) and json.loads(path.read_text())["pid"] == os.getpid()  # its holder is gone: taken over
    path.write_text(json.dumps({"host": "another-machine", "pid": 1}))
    assert not claim_file(path)  # another host's pid cannot be checked: held
    path.write_text('{"host": "')  # being written by its claimant this instant: held
    assert not claim_file(path)
    os.utime(path, (path.stat().st_mtime - 120,) * 2)  # still half-written two minutes later: a crash
    assert claim_file(path) and json.loads(path.read_text())["pid"] == os.getpid()


def test_a_run_another_process_holds_is_skipped_and_named(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "rkcnn-none-10_s1.claim").write_text(json.dumps({"host": socket.gethostname(),
                                                                              "pid": other.pid}))
        assert main(["experiment", "rkcnn-arms", "--dry-run", "--plan", "dead", "--arms", "rkcnn-none-10",
                     "--out", str(tmp_path)]) == 0
    finally:
        other.kill()
        other.wait()
    rows = json.loads((tmp_path / "results.json").read_text())["per_run"]
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("baseline-relu", 0), ("baseline-relu", 1), ("rkcnn-none-10", 0)]
    assert "rkcnn-none-10 seed 1 is being trained by another process" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "rkcnn-none-10_s1").exists()
    assert not list((tmp_path / "runs").glob("*_s0.claim"))  # its own claims are released
    # --saved-only trains nothing: the summary of the saved rows, the missing run named
    capsys.readouterr()
    assert main(["experiment", "rkcnn-arms", "--dry-run", "--plan", "dead", "--arms", "rkcnn-none-10", "--saved-only",
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["per_run"] == rows
    assert "1 run(s) not saved yet, left out of this summary: rkcnn-none-10 seed 1" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "rkcnn-none-10_s1").exists()
