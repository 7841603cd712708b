"""RkCNN-initialised training and the rkcnn-vs-baseline / rkcnn-layers experiments.

Known answers: a checkpoint trained with --init rkcnn records its mined latents (metadata list and
the init_from_dirs_F mask in the weights), those decoder rows (and encoder columns) are the mined
directions at step 0, and the other rows are exactly the baseline's random rows; group statistics
on hand-set counts; the experiment's intervals equal statistics.diff_means_ci on its own per-seed
values; dry runs write the documented keys and PNGs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.store.synthetic import make_synthetic_store
from saelab.train import sources as td
from saelab.cli import build_parser, main, rewrite_aliases
from saelab.errors import UsageError
from saelab.experiments import rkcnn_compare as rc
from saelab.experiments import rkcnn_layers as rl
from saelab.saes import load_sae
from saelab.statistics import diff_means_ci, mean_std
from saelab.train import TrainConfig, init_dirs, train

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "s", d_in=16, n_tokens=8192,
                                   chunk_tokens=512, seed=0, hook="model.layers.3.mlp")


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(store), out=str(out), batch_size=128, tokens=128, d_sae=64, k=[4], eval_every=0,
                eval_tokens=512, checkpoint_every=0, warmup_steps=1, init_tokens=1024, shuffle_chunks=2,
                val_fraction=0.2, lr=1e-12, rkcnn_fraction=0.25, rkcnn_subsets=64, rkcnn_subset_size=4)
    base.update(kw)
    return TrainConfig(**base)


def _unit(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# training with --init rkcnn


def test_checkpoint_records_mined_latents_at_their_mined_directions(store, tmp_path):
    # lr 1e-12 and one step: the saved weights are the step-0 weights up to ~1e-12.
    cfg = _cfg(store, tmp_path / "rk", init="rkcnn")
    sae = load_sae(train(cfg, quiet=True).final_dir)
    n = round(0.25 * 64)
    assert sae.metadata["mined_latents"] == list(range(n))
    assert sae.init_from_dirs_F.tolist() == [True] * n + [False] * (64 - n)
    assert sae.metadata["training"]["init"] == "rkcnn" and sae.metadata["training"]["rkcnn_subsets"] == 64

    x_ND = td.init_sample(td.open_store(str(store)), "model.layers.3.mlp", cfg)
    want_MD = init_dirs(cfg, 64, x_ND)
    assert want_MD.shape == (n, 16)
    assert ((want_MD != 0).sum(1) == 4).all()  # each mined direction lives on its 4-dim subset
    torch.testing.assert_close(_unit(sae.W_dec_FD[:n]), want_MD, atol=1e-5, rtol=0)
    # The method: the encoder columns of mined latents stay random (not W_dec^T); the others are tied.
    cos_F = (_unit(sae.W_enc_DF.T) * _unit(sae.W_dec_FD)).sum(1)
    assert cos_F[:n].abs().max() < 0.9 and (cos_F[n:] > 0.999).all()
    tied = load_sae(train(_cfg(store, tmp_path / "tied", init="rkcnn", rkcnn_init_encoder="tied"),
                          quiet=True).final_dir)
    torch.testing.assert_close(_unit(tied.W_enc_DF.T[:n]), want_MD, atol=1e-5, rtol=0)  # encoder = decoder^T

    base = load_sae(train(_cfg(store, tmp_path / "base", init="random"), quiet=True).final_dir)
    assert base.metadata["mined_latents"] == [] and not base.init_from_dirs_F.any()
    # Same seed: the non-mined latents start at exactly the baseline's random rows.
    torch.testing.assert_close(_unit(sae.W_dec_FD[n:]), _unit(base.W_dec_FD[n:]), atol=1e-5, rtol=0)
    assert (_unit(base.W_dec_FD[:n]) - want_MD).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["data_rows", "kmeans", "pca"])
def test_other_data_driven_inits_train(store, tmp_path, kind):
    sae = load_sae(train(_cfg(store, tmp_path / kind, init=kind), quiet=True).final_dir)
    assert sae.init_from_dirs_F.sum() == 16 and sae.metadata["training"]["init"] == kind


def test_train_flags_reach_the_config():
    from saelab.cli.train import build_train_config

    argv = ["train", "--init", "rkcnn", "--rkcnn-fraction", "0.3", "--rkcnn-subsets", "600",
            "--rkcnn-subset-size", "24", "--rkcnn-score", "variance_ratio"]
    cfg = build_train_config(build_parser().parse_args(rewrite_aliases(argv)))
    rk = cfg.rkcnn
    assert (cfg.init, rk.rkcnn_fraction, rk.rkcnn_subsets, rk.rkcnn_subset_size, rk.rkcnn_score) == (
        "rkcnn", 0.3, 600, 24, "variance_ratio")
    argv += ["--rkcnn-dedup", "cos_cap", "--rkcnn-init-encoder", "tied"]
    cfg = build_train_config(build_parser().parse_args(rewrite_aliases(argv)))
    assert cfg.rkcnn.rkcnn_dedup == "cos_cap" and cfg.rkcnn.rkcnn_init_encoder == "tied"
    with pytest.raises(UsageError) as e:
        TrainConfig(rkcnn_fraction=1.5, rkcnn_subsets=0)
    assert all(s in str(e.value) for s in ("rkcnn_fraction=1.5", "rkcnn_subsets=0"))  # every problem at once


# ---------------------------------------------------------------------------------------------------
# measuring and summarising


def test_group_stats_hand_computed():
    act = rc.LatentActivity(torch.tensor([2, 0, 1, 3]), torch.tensor([4.0, 0.0, 3.0, 3.0], dtype=torch.float64), 10)
    g = rc.group_stats(act, torch.tensor([True, True, False, False]))
    assert g == {"mined_mean_act": 2.0, "mined_dead_frac": 0.5, "other_mean_act": 1.5, "other_dead_frac": 0.0}
    g = rc.group_stats(act, torch.zeros(4, dtype=torch.bool))
    assert math.isnan(g["mined_mean_act"]) and math.isnan(g["mined_dead_frac"]) and g["other_dead_frac"] == 0.25


def test_max_cos_hand_computed():
    W = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [5.0, 5.0]])
    # rows 0..2: |cos| 0-1 = 0.6, 0-2 = 0, 1-2 = 0.8 -> max per row 0.6, 0.8, 0.8
    assert rc.max_cos(W, torch.tensor([True, True, True, False])) == pytest.approx((0.6 + 0.8 + 0.8) / 3)
    assert math.isnan(rc.max_cos(W, torch.tensor([True, False, False, False])))


def test_latent_activity_counts_and_sums(store):
    from saelab.saes import REGISTRY, make_sae

    sae = make_sae(REGISTRY["topk"][1](d_in=16, d_sae=32, k=3))
    x = torch.randn(50, 16)
    act = rc.latent_activity(sae, [x[:20], x[20:]])
    f = sae.encode(x).detach()
    assert act.tokens == 50 and int(act.count_F.sum()) == 50 * 3
    assert act.count_F.tolist() == (f > 0).sum(0).tolist()
    torch.testing.assert_close(act.sum_F, f.double().sum(0))


def _rows(rng, n_seeds=4):
    rows = []
    for s in range(n_seeds):
        for method, dead in (("baseline", 0.30), ("rkcnn", 0.10)):
            v = {m: float(rng.normal(1.0, 0.1)) for m in rc.METRICS}
            v["dead_frac"] = dead + float(rng.normal(0, 0.01))
            rows.append({"seed": s, "method": method, **v})
    return rows


def test_summary_intervals_are_statistics_diff_means_ci():
    rows = _rows(np.random.default_rng(0))
    res = rc.summarise(rows, level=0.9)
    for metric in rc.METRICS:
        rk = [r[metric] for r in rows if r["method"] == "rkcnn"]
        bl = [r[metric] for r in rows if r["method"] == "baseline"]
        assert res["summary"][metric]["diff"] == diff_means_ci(rk, bl, 0.9)._asdict()
        assert res["summary"][metric]["baseline"] == mean_std(bl)._asdict()
        assert res["summary"][metric]["rkcnn"] == mean_std(rk)._asdict()
    rk = [r for r in rows if r["method"] == "rkcnn"]
    assert res["mined_vs_others"]["mean_act"]["diff"] == diff_means_ci(
        [r["mined_mean_act"] for r in rk], [r["other_mean_act"] for r in rk], 0.9)._asdict()
    assert res["claims"]["fewer_dead"] is True  # planted: 10% vs 30% dead, tiny noise


# ---------------------------------------------------------------------------------------------------
# the experiments, dry run


def test_vs_baseline_dry_run_writes_documented_results(tmp_path, capsys):
    assert main(["experiment", "rkcnn-vs-baseline", "--dry-run", "--out", str(tmp_path), "-q"]) == 0
    assert "rkcnn - baseline" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == set(rc.RESULT_KEYS) and res["dry_run"] is True
    assert set(res["summary"]) == set(rc.METRICS)
    seeds = res["config"]["seeds"]
    assert len(res["per_seed"]) == 2 * seeds
    for r in res["per_seed"]:
        assert r["n_mined"] == round(0.5 * res["d_sae"])  # rkcnn_fraction 0.5; the baseline uses the same indices
        assert r["dead_count"] == round(r["dead_frac"] * res["d_sae"])
        assert 0 < r["fvu"] and 0 < r["l0"] <= res["config"]["k"]
    for metric in ("dead_frac", "fvu", "l0"):  # the CI in the JSON is diff_means_ci of the JSON's own values
        rk = [r[metric] for r in res["per_seed"] if r["method"] == "rkcnn"]
        bl = [r[metric] for r in res["per_seed"] if r["method"] == "baseline"]
        d = res["summary"][metric]["diff"]
        np.testing.assert_allclose([d["estimate"], d["low"], d["high"]], list(diff_means_ci(rk, bl)), rtol=1e-12)
    for name in rc.PLOTS.values():
        assert (tmp_path / name).read_bytes()[:8] == PNG
    run_dir = Path(res["per_seed"][0]["run_dir"])
    assert load_sae(run_dir / "final").metadata["mined_latents"] == list(range(res["per_seed"][0]["n_mined"]))


def test_layers_dry_run_writes_one_plot_for_all_layers(tmp_path):
    res = rl.run(rl.Config(layers="4,2"), tmp_path, dry_run=True, quiet=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == set(rl.RESULT_KEYS) and saved["layer_indices"] == [2, 4] == res["layer_indices"]
    assert [e["hook"] for e in saved["layers"]] == ["model.layers.2.mlp", "model.layers.4.mlp"]
    for e in saved["layers"]:
        assert set(e["summary"]) == set(rc.METRICS) and len(e["per_seed"]) == 2 * saved["config"]["seeds"]
    assert (tmp_path / rl.PLOTS["dead_per_layer"]).read_bytes()[:8] == PNG
    assert (tmp_path / "layer_02" / rc.PLOTS["dead_latents"]).read_bytes()[:8] == PNG


def test_layers_resolution_and_errors(store):
    assert rl.resolve_layers(rl.Config(layers="all"), str(store)) == [3]  # the store's matching hooks
    assert rl.resolve_layers(rl.Config(layers="15, 0,7"), None) == [0, 7, 15]
    with pytest.raises(UsageError, match="comma-separated"):
        rl.Config(layers="first")
    with pytest.raises(UsageError, match="no hook of the store"):
        rl.resolve_layers(rl.Config(hook_template="model.layers.{layer}.attn"), str(store))
    with pytest.raises(UsageError, match="is not in the store"):
        rc.check_hook(str(store), "model.layers.15.mlp")
    with pytest.raises(UsageError, match="seeds"):
        rc.Config(seeds=1)
