"""The shared SAE contract, parametrised over the registry: save/load, folding, load errors, options."""
import json

import pytest
import torch

from saelab.errors import UsageError
from saelab.saes import FORMAT_VERSION, REGISTRY, load_sae, make_sae

ARCHS = sorted(REGISTRY)


def trained_sae(name, tied=False, steps=3, d_in=12, d_sae=40):
    """A small SAE after a few real optimiser steps (so every buffer has moved from its init)."""
    extra = {"k": 4} if "topk" in name else {}
    sae = make_sae(REGISTRY[name][1](d_in=d_in, d_sae=d_sae, tied=tied, **extra))
    x = torch.randn(256, d_in) * 5 + 2
    sae.init_from_data_(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(steps):
        sae.training_loss(x).loss.backward()
        sae.before_optimizer_step_()
        opt.step()
        opt.zero_grad()
        sae.after_optimizer_step_()
    return sae.eval(), x


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", ARCHS)
def test_save_load_round_trip(tmp_path, name, tied):
    sae, x = trained_sae(name, tied)
    assert float(sae.input_scale) != 1.0
    with torch.no_grad():
        x_hat, f = sae(x)
    sae.save(tmp_path / "sae", metadata={"hook": "model.layers.3"})
    loaded = load_sae(tmp_path / "sae", device="cpu")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    assert loaded.metadata["hook"] == "model.layers.3"
    assert float(loaded.input_scale) == 1.0  # folded
    with torch.no_grad():
        x_hat2, f2 = loaded(x)
    # Folding changes the arithmetic, not the function: equal up to float rounding.
    torch.testing.assert_close(f2, f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_hat2, x_hat, atol=1e-4, rtol=1e-4)
    # A loaded SAE saved again round-trips bit for bit.
    loaded.save(tmp_path / "again")
    again = load_sae(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(x)[0], x_hat2) and torch.equal(again(x)[1], f2)
    # The documented snippet.
    x_hat3, f3 = again(x)
    assert (f3 > 0).sum(-1).shape == (x.shape[0],)


@pytest.mark.parametrize("name", ARCHS)
def test_folding_invariance(name):
    """The folded state dict, loaded into a fresh module, computes the same x -> (x_hat, f)."""
    sae, x = trained_sae(name)
    fresh = make_sae(sae.cfg)
    fresh.load_state_dict(sae.folded_state_dict())
    fresh.eval()
    with torch.no_grad():
        for a, b in zip(sae(x), fresh(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert float(fresh.input_scale) == 1.0


def test_save_replaces_old_directory_atomically(tmp_path):
    sae, _ = trained_sae("topk")
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "stale.txt").write_text("old")
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "metadata.json", "model.safetensors"]
    assert not (tmp_path / "sae.tmp").exists() and not (tmp_path / "sae.old").exists()
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["format_version"] == FORMAT_VERSION and cfg["k"] == 4


def _rewrite_weights(path, mutate):
    from safetensors.torch import load_file, save_file

    t = load_file(str(path / "model.safetensors"))
    mutate(t)
    save_file(t, str(path / "model.safetensors"))
    meta = json.loads((path / "metadata.json").read_text())
    meta.pop("weights_sha256")  # so that the structural checks, not the checksum, must catch it
    (path / "metadata.json").write_text(json.dumps(meta))


def test_load_errors(tmp_path):
    sae, _ = trained_sae("jumprelu")
    d = tmp_path / "s"

    sae.save(d)
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UsageError, match="newer"):
        load_sae(d)

    (d / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(UsageError, match="batchtopk, jumprelu, relu, topk"):
        load_sae(d)

    sae.save(d)
    _rewrite_weights(d, lambda t: t.pop("threshold_F"))
    with pytest.raises(UsageError, match="missing tensors: threshold_F"):
        load_sae(d)

    sae.save(d)
    _rewrite_weights(d, lambda t: t.update(extra_X=torch.zeros(2)))
    with pytest.raises(UsageError, match="unexpected tensors: extra_X"):
        load_sae(d)

    sae.save(d)
    _rewrite_weights(d, lambda t: t.update(b_dec_D=torch.zeros(13)))
    with pytest.raises(UsageError, match=r"b_dec_D has shape \[13\], expected \[12\]"):
        load_sae(d)

    sae.save(d)
    _rewrite_weights(d, lambda t: t["W_dec_FD"].__setitem__((0, 0), float("nan")))
    with pytest.raises(UsageError, match="W_dec_FD holds NaN"):
        load_sae(d)

    sae.save(d)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the last weight: safetensors itself would not notice
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="corrupted"):
        load_sae(d)

    with pytest.raises(UsageError, match="cfg.json is missing"):
        load_sae(tmp_path / "nowhere")


def test_init_dirs_recorded_and_used():
    dirs = torch.randn(5, 12)
    sae = make_sae(REGISTRY["topk"][1](d_in=12, d_sae=40, k=4), init_dirs_FD=dirs)
    torch.testing.assert_close(sae.W_dec_FD[:5], dirs / dirs.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(sae.W_enc_DF, sae.W_dec_FD.T)
    assert sae.init_from_dirs_F.tolist() == [True] * 5 + [False] * 35
    sae2 = make_sae(REGISTRY["relu"][1](d_in=12, d_sae=40), init_dirs_FD=lambda F_, D: torch.eye(D)[:3])
    assert sae2.init_from_dirs_F.sum() == 3
    with pytest.raises(UsageError, match="init_dirs_FD has shape"):
        make_sae(REGISTRY["relu"][1](d_in=12, d_sae=40), init_dirs_FD=torch.randn(3, 7))


def test_config_validation_lists_every_problem():
    with pytest.raises(UsageError) as e:
        REGISTRY["topk"][1](d_in=-1, k=0, aux_k=-2)
    msg = str(e.value)
    assert "d_in" in msg and "k must be" in msg and "aux_k" in msg


def test_init_from_data_scale_and_median():
    sae = make_sae(REGISTRY["topk"][1](d_in=8, d_sae=16, k=2))
    x = torch.randn(4000, 8) * 7 + 3
    sae.init_from_data_(x)
    xn = x * sae.input_scale
    torch.testing.assert_close(xn.pow(2).sum(-1).mean(), torch.tensor(8.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(sae.b_dec_D.detach(), xn.median(0).values, atol=0.15, rtol=0)  # ~ symmetric data


def test_unit_norm_decoder_and_parallel_grad_removed():
    sae, x = trained_sae("topk", steps=5)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=-1), torch.ones(40), atol=1e-5, rtol=0)
    sae.train()
    sae.training_loss(x).loss.backward()
    sae.before_optimizer_step_()
    torch.testing.assert_close((sae.W_dec_FD.grad * sae.W_dec_FD).sum(-1), torch.zeros(40), atol=1e-5, rtol=0)
