"""An SAE saved by SAELens, used by saelab's tools on the embedded SmolLM2-135M-Instruct (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from saelab import load_sae
from tests.builders import make_text_corpus


def saelab(*args: str, cwd) -> str:
    res = subprocess.run([sys.executable, "-m", "saelab", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, SAELAB_TORCH_THREADS="2"))
    assert res.returncode == 0, f"saelab {' '.join(args)} failed:\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.mark.slow
def test_saelens_sae_through_import_evaluate_dashboard_intervene(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="needs the interop extra")
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=8, seed=5, words=(150, 300))
    saelab("collect", "--layer", "3", "--corpus", str(corpus), "--out", "store", "--tokens", "2000",
           "--max-length", "128", "--batch-size", "4", "--chunk-tokens", "512", "--quiet", cwd=tmp_path)

    cfg = sae_lens.saes.TopKSAEConfig(d_in=576, d_sae=1152, k=16)
    cfg.metadata.hook_name, cfg.metadata.model_name = "blocks.3.hook_resid_post", "SmolLM2-135M-Instruct"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae_lens.saes.TopKSAE(cfg).save_model(tmp_path / "from_saelens")

    out = saelab("import", "from_saelens", "imported", "--model", "default", cwd=tmp_path)
    assert "saelens -> saelab topk, d_in=576, d_sae=1152, k=16" in out and "hook:  model.layers.3" in out
    assert "(checked)" in out
    direct, imported = load_sae(tmp_path / "from_saelens"), load_sae(tmp_path / "imported")
    x = torch.randn(32, 576) * 3
    torch.testing.assert_close(direct(x)[0], imported(x)[0], rtol=0, atol=0)

    # the SAELens directory itself and its saelab import give the same evaluation (the store's model is
    # not checked for the direct one: a foreign directory records no saelab model id)
    for name in ("from_saelens", "imported"):
        saelab("evaluate", name, "--data", "store", "--split", "all", "--out", f"eval_{name}", "--quiet", cwd=tmp_path)
    a, b = (json.loads((tmp_path / f"eval_{n}" / "eval.json").read_text())["results"][0]
            for n in ("from_saelens", "imported"))
    assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-6) and a["l0"] == pytest.approx(16)

    saelab("dashboard", "from_saelens", "--data", "store", "--model", "default", "--out", "dash.html", "--features",
           "16", "--quiet", cwd=tmp_path)
    assert (tmp_path / "dash.html").stat().st_size > 10_000
    out = saelab("intervene", "imported", "--model", "default", "--corpus", str(corpus), "--ablate", "0",
                 "--tokens", "256", "--max-length", "128", cwd=tmp_path)
    assert "loss" in out.lower()
