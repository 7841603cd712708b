"""SAELens <-> saelab, against the real SAELens: its SAEs imported, saelab's export loaded by SAELens."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import UsageError
from saelab.export import export_saelens
from saelab.saes import REGISTRY, load_sae, make_sae
from saelab.saes.formats import detect_format, load_foreign

sl = pytest.importorskip("sae_lens", reason="needs the interop extra: pip install -e '.[interop]'")
from sae_lens import SAE as SLSAE  # noqa: E402
from sae_lens.saes import (  # noqa: E402
    BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedSAE, GatedSAEConfig, GatedTrainingSAE,
    GatedTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig,
    StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig, TopKSAE, TopKSAEConfig,
    TopKTrainingSAE, TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

D, F = 16, 48
CASES = {  # name -> (SAELens class, config class, config kwargs, saelab architecture)
    "standard": (StandardSAE, StandardSAEConfig, {}, "relu"),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 5}, "topk"),
    "topk_rescaled": (TopKSAE, TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}, "topk"),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}, "jumprelu"),
    "jumprelu_no_bdec": (JumpReLUSAE, JumpReLUSAEConfig, {"apply_b_dec_to_input": False}, "jumprelu"),
    "gated": (GatedSAE, GatedSAEConfig, {}, "jumprelu"),
}


@pytest.fixture(autouse=True)
def _quiet_saelens():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _inputs(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 2 + 0.5


def _saelens_sae(name, hook="blocks.3.hook_resid_post"):
    cls, cfg_cls, kw, _ = CASES[name]
    cfg = cfg_cls(d_in=D, d_sae=F, **kw)
    cfg.metadata.hook_name, cfg.metadata.model_name = hook, "tiny-llama"
    sae = cls(cfg)
    with torch.no_grad():  # non-unit decoder rows, non-zero biases, thresholds of both signs
        for n, p in sae.named_parameters():
            p.copy_(torch.rand_like(p) * 1.2 - 0.2 if n == "threshold" else torch.randn_like(p) * 0.3)
    return sae.eval()


def _reference(sae, x):
    with torch.no_grad():
        f = sae.encode(x)
        return f, sae.decode(f)


@pytest.mark.parametrize("name", sorted(CASES))
def test_saelens_sae_imports_exactly(tmp_path, agree, name):
    sae = _saelens_sae(name)
    sae.save_model(tmp_path / name)
    assert detect_format(tmp_path / name) == "saelens"
    ours = load_foreign(tmp_path / name)
    assert ours.cfg.architecture == CASES[name][3]
    assert ours.metadata["hook"] == "model.layers.3" and ours.metadata["imported"]["model"] == "tiny-llama"
    assert ours.metadata["imported"]["foreign_hook"] == "blocks.3.hook_resid_post"
    x = _inputs()
    agree(ours, x, *_reference(sae, x))
    # the same SAE after SAELens's own reload, and after a saelab save -> load_sae round trip
    agree(ours, x, *_reference(SLSAE.load_from_disk(tmp_path / name), x))
    ours.save(tmp_path / "saelab")
    agree(load_sae(tmp_path / "saelab"), x, *_reference(sae, x))


def test_saelens_batchtopk_saved_as_jumprelu(tmp_path, agree):
    cfg = BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=4)
    train_sae = BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        for p in train_sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        train_sae.topk_threshold.fill_(0.4)
    train_sae.save_inference_model(tmp_path / "btk")
    ref = SLSAE.load_from_disk(tmp_path / "btk")
    assert type(ref).__name__ == "JumpReLUSAE"
    ours = load_foreign(tmp_path / "btk", format="saelens")
    assert ours.cfg.architecture == "jumprelu"
    assert torch.allclose(ours.threshold_F, torch.full((F,), 0.4))
    x = _inputs()
    agree(ours, x, *_reference(ref, x))


TRAINING = {  # SAELens training SAEs: (class, config class, kwargs, saelab architecture after import)
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, {}, "relu"),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 4}, "topk"),  # rescale_acts_by_decoder_norm by default
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": 4}, "jumprelu"),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {}, "jumprelu"),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, {}, "jumprelu"),
}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_trained_by_saelens_and_saved_for_inference(tmp_path, agree, name):
    """SAELens's own training step for a few Adam steps, then save_inference_model, as its runner ends."""
    cls, cfg_cls, kw, arch = TRAINING[name]
    sae = cls(cfg_cls(d_in=D, d_sae=F, **kw))
    x = _inputs(256, seed=5)
    coeffs = {k: getattr(v, "value", v) for k, v in sae.get_coefficients().items()}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(20):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeffs, dead_neuron_mask=None,
                                                       n_training_steps=step, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    sae.save_inference_model(tmp_path / name)
    ref = SLSAE.load_from_disk(tmp_path / name)
    ours = load_foreign(tmp_path / name)
    assert ours.cfg.architecture == arch
    x_test = _inputs(seed=6)
    agree(ours, x_test, *_reference(ref, x_test))


def _trained_saelab(name, tied=False):
    extra = {"k": 4} if "topk" in name else {}
    sae = make_sae(REGISTRY[name][1](d_in=D, d_sae=F, tied=tied, **extra))
    x = _inputs(256, seed=2) * 2
    sae.init_from_data_(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        sae.training_loss(x).loss.backward()
        sae.before_optimizer_step_()
        opt.step()
        opt.zero_grad()
        sae.after_optimizer_step_()
    return sae


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_saelens_loads_saelab_export(tmp_path, agree, name, tied):
    _trained_saelab(name, tied).save(tmp_path / "sae", metadata={"hook": "model.layers.7", "model": {"name": "tiny"}})
    export_saelens(tmp_path / "sae", tmp_path / "out")
    theirs = SLSAE.load_from_disk(tmp_path / "out")
    assert theirs.cfg.metadata.hook_name == "blocks.7.hook_resid_post"
    ours = load_sae(tmp_path / "sae")
    x = _inputs(seed=3) * 2
    f_t, x_hat_t = _reference(theirs, x)
    agree(ours, x, f_t, x_hat_t)
    back = load_foreign(tmp_path / "out")  # and back into saelab: the saelab hook name comes back exactly
    assert back.metadata["hook"] == "model.layers.7"
    agree(back, x, f_t, x_hat_t)


def test_pre_6_config_and_finetuning_scaling_factor(tmp_path, agree):
    """A directory as SAELens 5 wrote it: top-level hook_point, activation_fn_str, a scaling_factor."""
    g = torch.Generator().manual_seed(4)
    w = {"W_enc": torch.randn(D, F, generator=g), "W_dec": torch.randn(F, D, generator=g) * 0.2,
         "b_enc": torch.randn(F, generator=g), "b_dec": torch.randn(D, generator=g),
         "scaling_factor": torch.rand(F, generator=g) + 0.5}
    (tmp_path / "old").mkdir()
    save_file(w, str(tmp_path / "old" / "sae_weights.safetensors"))
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({
        "d_in": D, "d_sae": F, "hook_point": "blocks.2.hook_mlp_out", "model_name": "gemma-2-2b",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": True, "dtype": "float32", "normalize_activations": "none"}))
    ours = load_foreign(tmp_path / "old")
    assert ours.cfg.architecture == "topk" and ours.cfg.k == 6
    assert ours.metadata["hook"] == "model.layers.2.post_feedforward_layernorm"  # Gemma 2: after the post-MLP norm
    x = _inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    v, i = pre.topk(6, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    agree(ours, x, f, (f * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"])


def test_bad_saelens_directories(tmp_path):
    sae = _saelens_sae("jumprelu")
    sae.save_model(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": F + 2}))
    with pytest.raises(UsageError, match=r"(?s)does not match.*W_enc has shape \[16, 48\], expected \[16, 50\]"
                                         r".*threshold has shape \[48\], expected \[50\]"):
        load_foreign(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(UsageError, match="rescales every token"):
        load_foreign(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matching_pursuit"}))
    with pytest.raises(UsageError, match="'matching_pursuit' cannot be imported"):
        load_foreign(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    w = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    del w["threshold"]
    save_file(w, str(tmp_path / "a" / "sae_weights.safetensors"))
    with pytest.raises(UsageError, match="missing tensors: threshold"):
        load_foreign(tmp_path / "a")
    (tmp_path / "a" / "sae_weights.safetensors").unlink()
    with pytest.raises(UsageError, match="sae_weights.safetensors is missing"):
        load_foreign(tmp_path / "a", format="saelens")
