"""Gemma Scope-style params.npz -> saelab, checked against the release's documented JumpReLU equations."""
import numpy as np
import pytest
import torch

from saelab.cli import main
from saelab.errors import UsageError
from saelab.saes import load_sae
from saelab.saes.formats import detect_format, load_foreign

D, F = 16, 48


def _params(seed=0, threshold=True):
    rng = np.random.default_rng(seed)
    p = {"W_enc": rng.normal(0, 0.3, (D, F)), "W_dec": rng.normal(0, 0.3, (F, D)),
         "b_enc": rng.normal(0, 0.3, F), "b_dec": rng.normal(0, 0.3, D)}
    if threshold:
        p["threshold"] = rng.uniform(-0.2, 1.0, F)
    return {k: v.astype(np.float32) for k, v in p.items()}


def gemma_scope_reference(p, x):
    """The Gemma Scope tutorial's JumpReLUSAE: no b_dec subtracted before the encoder."""
    w = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ w["W_enc"] + w["b_enc"]
    f = (pre > w["threshold"]) * torch.relu(pre) if "threshold" in w else torch.relu(pre)
    return f, f @ w["W_dec"] + w["b_dec"]


def _x(seed=1):
    return torch.randn(96, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def test_gemma_scope_layout_imports_exactly(tmp_path, agree):
    d = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    d.mkdir(parents=True)
    p = _params()
    np.savez(d / "params.npz", **p)
    assert detect_format(d) == "npz" and detect_format(d / "params.npz") == "npz"
    ours = load_foreign(d)
    assert ours.cfg.architecture == "jumprelu" and ours.metadata["hook"] == "model.layers.12"
    x = _x()
    agree(ours, x, *gemma_scope_reference(p, x))
    ours.save(tmp_path / "saelab")
    agree(load_sae(tmp_path / "saelab"), x, *gemma_scope_reference(p, x))


def test_relu_archive_and_transposed_matrices(tmp_path, agree):
    p = _params(threshold=False)
    np.savez(tmp_path / "sae.npz", W_enc=p["W_enc"].T, W_dec=p["W_dec"].T, b_enc=p["b_enc"], b_dec=p["b_dec"])
    ours = load_foreign(tmp_path / "sae.npz", hook="model.layers.1")
    assert ours.cfg.architecture == "relu" and ours.metadata["hook"] == "model.layers.1"
    assert sum("transposed" in n for n in ours.metadata["imported"]["notes"]) == 2
    x = _x()
    agree(ours, x, *gemma_scope_reference(p, x))


def test_bad_archives(tmp_path):
    p = _params()
    np.savez(tmp_path / "a.npz", **{k: v for k, v in p.items() if k != "b_dec"})
    with pytest.raises(UsageError, match="lacks b_dec"):
        load_foreign(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", **{**p, "threshold": p["threshold"][:-1]})
    with pytest.raises(UsageError, match=r"threshold has shape \[47\], expected \[48\]"):
        load_foreign(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"PK not really")
    with pytest.raises(UsageError, match="not a readable .npz archive"):
        load_foreign(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", W_enc=np.array([object()], dtype=object), W_dec=p["W_dec"], b_enc=p["b_enc"],
             b_dec=p["b_dec"])
    with pytest.raises(UsageError, match="not a readable .npz archive"):  # pickled arrays are never loaded
        load_foreign(tmp_path / "d.npz")


def test_cli_import_then_tools_read_it(tmp_path, capsys):
    d = tmp_path / "layer_3"
    d.mkdir()
    np.savez(d / "params.npz", **_params())
    out = tmp_path / "imported"
    assert main(["import", "--format", "npz", str(d), str(out), "--hook", "model.layers.3"]) == 0
    text = capsys.readouterr().out
    assert "npz -> saelab jumprelu, d_in=16, d_sae=48" in text and "hook:  model.layers.3" in text
    assert "unknown (not checked: pass --model)" in text
    sae = load_sae(out)
    assert sae.metadata["hook"] == "model.layers.3" and sae.metadata["model"] == {}
    assert sae.metadata["imported"]["format"] == "npz"
    assert main(["import", "--format", "npz", str(d), str(out)]) == 2  # OUT exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", "--format", "saelens", str(d), str(tmp_path / "o2")]) == 2
    assert "in the npz format, not saelens" in capsys.readouterr().err
