"""The whole pipeline through the `saelab` command on the embedded SmolLM2-135M-Instruct:
collect -> verify -> train -> evaluate (downstream) -> interpret -> dashboard -> intervene -> export."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from saelab import load_sae
from tests.builders import make_text_corpus


def saelab(*args: str, cwd) -> str:
    res = subprocess.run([sys.executable, "-m", "saelab", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, SAELAB_TORCH_THREADS="2"))
    assert res.returncode == 0, f"saelab {' '.join(args)} failed:\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.slow
def test_pipeline_on_the_embedded_model(tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=12, seed=3, words=(150, 300))
    saelab("collect", "--layer", "6", "--corpus", str(corpus), "--out", "store", "--tokens", "3000",
           "--max-length", "128", "--batch-size", "4", "--chunk-tokens", "512", "--verify", "--quiet", cwd=tmp_path)
    assert "✓" in saelab("verify", "store", cwd=tmp_path)

    saelab("train", "--data", "store", "--out", "run", "--architecture", "topk", "--expansion-factor", "2",
           "--k", "16", "--batch-size", "256", "--epochs", "4", "--eval-every", "10", "--lr", "1e-3",
           "--warmup-steps", "5", "--val-fraction", "0.2", "--quiet", cwd=tmp_path)
    sae = load_sae(tmp_path / "run" / "sae_best")
    assert sae.cfg.d_in == 576 and sae.cfg.d_sae == 1152 and sae.metadata["hook"] == "model.layers.6"

    saelab("evaluate", "run/sae_best", "--data", "store", "--model", "default", "--corpus", str(corpus),
           "--eval-tokens", "512", "--out", "eval", "--quiet", cwd=tmp_path)
    (res,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert 0.0 <= res["fvu"] < 1.0 and res["l0"] == pytest.approx(16)
    assert res["ce_clean"] < res["ce_zero"]           # zero-ablating a residual stream hurts
    assert res["ce_recovered"] > 0.0                   # the SAE puts back part of what ablation removes
    lead = next(line for line in (tmp_path / "eval" / "eval.md").read_text().splitlines() if line.startswith("- **"))
    assert lead.index("per-token relative error") < lead.index("CE loss recovered") < lead.index("FVU")

    out = saelab("interpret", "stats", "run/sae_best", "--data", "store", "--out", "stats", cwd=tmp_path)
    assert "dead" in out and (tmp_path / "stats" / "feature_stats.csv").exists()
    feature = next(i for i, f in enumerate(json.loads((tmp_path / "stats" / "feature_stats.json").read_text())
                                           ["features"]) if f["frequency"] > 0)
    out = saelab("interpret", "feature", "run/sae_best", "--data", "store", "--feature", str(feature),
                 "--top-k", "5", "--model", "default", cwd=tmp_path)
    assert "[[" in out  # the activating token is marked in its context

    saelab("dashboard", "run/sae_best", "--data", "store", "--out", "dash.html", "--features", "32", "--quiet",
           cwd=tmp_path)
    assert (tmp_path / "dash.html").stat().st_size > 10_000

    out = saelab("intervene", "run/sae_best", "--model", "default", "--corpus", str(corpus), "--ablate",
                 str(feature), "--tokens", "512", "--max-length", "128", cwd=tmp_path)
    assert "loss" in out.lower()

    saelab("export", "--format", "saelens", "run/sae_best", "saelens", cwd=tmp_path)
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["d_in"] == 576 and cfg["hook_name"] == "blocks.6.hook_resid_post"  # the TransformerLens name
    assert cfg["metadata"]["saelab_hook"] == "model.layers.6"
