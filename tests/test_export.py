"""SAELens export: names, orientation, cfg fields, and outputs reproduced by SAELens' equations."""
import json

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.errors import UsageError
from saelab.export import export_saelens, saelens_reference_forward
from saelab.saes import REGISTRY, load_sae, make_sae


def _trained(name, tied=False):
    extra = {"k": 4} if "topk" in name else {}
    sae = make_sae(REGISTRY[name][1](d_in=12, d_sae=40, tied=tied, **extra))
    x = torch.randn(128, 12) * 4 + 1
    sae.init_from_data_(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        sae.training_loss(x).loss.backward()
        sae.before_optimizer_step_()
        opt.step()
        opt.zero_grad()
        sae.after_optimizer_step_()
    return sae, x


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_export_reproduces_outputs(tmp_path, name, tied):
    sae, x = _trained(name, tied)
    sae.save(tmp_path / "sae", metadata={"hook": "model.layers.7", "model": {"name": "tiny"}})
    export_saelens(tmp_path / "sae", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 40 and cfg["hook_layer"] == 7 and cfg["model_name"] == "tiny"
    assert w["W_enc"].shape == (12, 40) and w["W_dec"].shape == (40, 12)
    assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if cfg["architecture"] == "jumprelu" else set())
    loaded = load_sae(tmp_path / "sae")
    with torch.no_grad():
        x_hat, f = loaded(x)
    x_hat_ref, f_ref = saelens_reference_forward(cfg, w, x)
    torch.testing.assert_close(f_ref, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat_ref, x_hat, atol=1e-5, rtol=1e-5)


def test_cli_export_and_overwrite(tmp_path, capsys):
    sae, _ = _trained("topk")
    sae.save(tmp_path / "sae")
    assert main(["export", "--format", "saelens", str(tmp_path / "sae"), str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 4}
    assert main(["export", str(tmp_path / "sae"), str(tmp_path / "out")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(UsageError, match="cfg.json is missing"):
        export_saelens(tmp_path / "nope", tmp_path / "o2")
