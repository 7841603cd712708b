"""EleutherAI sparsify -> saelab, against the real sparsify: SparseCoder.save_to_disk, then load_foreign."""
import json

import pytest
import torch

from saelab.errors import UsageError
from saelab.saes import load_sae
from saelab.saes.formats import detect_format, load_foreign

sparsify = pytest.importorskip("sparsify", reason="needs the interop extra: pip install -e '.[interop]'")

D, F, K = 16, 48, 5


def _coder(**cfg):
    sc = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=F, k=K, **cfg))
    with torch.no_grad():  # non-unit decoder rows and non-zero biases, as after training
        for p in sc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sc


def _reference(sc, x):
    with torch.no_grad():
        out = sc.encode(x)
        f = torch.zeros(x.shape[0], F).scatter_(1, out.top_indices, out.top_acts)
        return f, sc.decode(out.top_acts, out.top_indices)


def test_sparsify_run_imports_exactly(tmp_path, agree):
    sc = _coder()
    run = tmp_path / "run"
    sc.save_to_disk(run / "layers.2")
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "sae": {"k": K}}))
    assert detect_format(run) == "sparsify" and detect_format(run / "layers.2") == "sparsify"
    ours = load_foreign(run)  # the run's only hookpoint
    assert ours.cfg.architecture == "topk" and ours.cfg.k == K and (ours.cfg.d_in, ours.cfg.d_sae) == (D, F)
    assert ours.metadata["hook"] == "model.layers.2"
    assert ours.metadata["imported"]["model"] == "HuggingFaceTB/SmolLM2-135M"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, D, generator=g) * 2 + 0.5
    agree(ours, x, *_reference(sc, x))
    agree(ours, x, *_reference(sparsify.SparseCoder.load_from_disk(run / "layers.2"), x))
    ours.save(tmp_path / "saelab")
    agree(load_sae(tmp_path / "saelab"), x, *_reference(sc, x))


def test_sparsify_coder_trained_with_its_own_step(tmp_path, agree):
    """The pieces of sparsify's Trainer step: fvu + AuxK loss, gradient parallel to the decoder rows
    removed, Adam, decoder rows renormalised."""
    sc = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=F, k=K))
    x = torch.randn(1024, D, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    opt = torch.optim.Adam(sc.parameters(), lr=3e-3)
    for step in range(30):
        out = sc(x[(step * 128) % 1024:][:128], dead_mask=torch.rand(F) < 0.2)
        (out.fvu + out.auxk_loss).backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sc.set_decoder_norm_to_unit_norm()
    sc.save_to_disk(tmp_path / "layers.0.mlp")
    ours = load_foreign(tmp_path / "layers.0.mlp")
    assert ours.metadata["hook"] == "model.layers.0.mlp"
    agree(ours, x[:96], *_reference(sc, x[:96]))


def test_sparsify_run_with_several_hookpoints_asks_which(tmp_path):
    for hp in ("layers.0", "layers.1.mlp"):
        _coder().save_to_disk(tmp_path / "run" / hp)
    with pytest.raises(UsageError, match=r"holds 2 SAEs: layers\.0 \(sparsify\), layers\.1\.mlp \(sparsify\)"):
        load_foreign(tmp_path / "run")
    assert load_foreign(tmp_path / "run" / "layers.1.mlp").metadata["hook"] == "model.layers.1.mlp"


@pytest.mark.parametrize("option, message", [({"activation": "groupmax"}, "group-max"),
                                              ({"transcode": True}, "transcoder"),
                                              ({"skip_connection": True}, "W_skip")])
def test_sparsify_options_saelab_cannot_reproduce_are_refused(tmp_path, option, message):
    _coder(**option).save_to_disk(tmp_path / "sae")
    with pytest.raises(UsageError, match=message):
        load_foreign(tmp_path / "sae")


def test_sparsify_shapes_must_match_cfg(tmp_path):
    _coder().save_to_disk(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "d_in": D + 1}))
    with pytest.raises(UsageError, match=r"encoder\.weight has shape \[48, 16\], expected \[48, 17\]"):
        load_foreign(tmp_path / "sae")
