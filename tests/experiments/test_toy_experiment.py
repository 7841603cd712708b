"""`saelab experiment toy --dry-run` writes its JSON and PNGs with the documented keys."""
import json

import pytest
import torch

from saelab.cli import main
from saelab.experiments.toy import PLOTS, RESULT_KEYS, Config, run, subset_ceiling


def test_dry_run_writes_results_and_plots(tmp_path, capsys):
    assert main(["experiment", "toy", "--dry-run", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "top score" in out and ("PASS" in out or "FAIL" in out)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(RESULT_KEYS)
    assert results["dry_run"] is True and results["config"]["seeds"] == 2
    assert set(results["summary"]) == {"top_score_mean", "top_score_std", "top_score_cv", "recovery_mean",
                                       "recovery_std", "recovery_ceiling_mean"}
    assert set(results["checks"]) == {"top_score", "recovery", "cv"}
    assert results["passed"] == all(results["checks"].values())
    for seed in results["per_seed"]:
        assert 0 <= seed["recovery"] <= seed["recovery_ceiling"] + 1e-9 <= 1 + 1e-9
        assert len(seed["best_abs_cos"]) == 10
    for name in PLOTS.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["plots"] == PLOTS


def test_flags_and_yaml_override_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("score: variance_ratio\nm: 3\n")
    results_dir = tmp_path / "out"
    assert main(["experiment", "toy", "--dry-run", "--config", str(tmp_path / "c.yaml"), "--m", "1",
                 "--out", str(results_dir), "-q"]) == 0
    cfg = json.loads((results_dir / "results.json").read_text())["config"]
    assert cfg["score"] == "variance_ratio" and cfg["m"] == 1


def test_bad_config_is_a_usage_error(tmp_path, capsys):
    assert main(["experiment", "toy", "--seeds", "1", "--m", "9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "seeds=1" in err and "m=9" in err


def test_subset_ceiling_known_answers():
    t_FD = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(subset_ceiling(t_FD, 1), torch.tensor([0.8, 1.0]))
    torch.testing.assert_close(subset_ceiling(t_FD, 2), torch.tensor([1.0, 1.0]))


def test_ceiling_is_one_when_subsets_span_the_hidden_space(tmp_path):
    # m = d_hidden: a subset direction can be any unit vector, so every feature is reachable.
    res = run(Config(n_features=4, d_hidden=2, m=2, h=5, r=1, seeds=2, train_steps=50, n_samples=300),
              tmp_path, quiet=True)
    assert res["summary"]["recovery_ceiling_mean"] == pytest.approx(1.0)
