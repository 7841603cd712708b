"""saelab.intervene and `saelab intervene` on a tiny random Llama with a tiny TopK SAE."""
import pytest
import torch

from saelab.corpus import pack_sequences
from saelab.errors import UsageError
from saelab.cli.intervene import parse_edits
from saelab.intervene import (
    Edit, InterveneConfig, apply_edit, check_sae_model, edit_delta, edit_delta_reference, intervene, measure_effect,
)
from saelab.models import capture, splice, token_losses
from saelab.saes import TopKConfig, load_sae, make_sae
from tests.builders import BOS_ID, EOS_ID, PAD_ID, make_text_corpus, random_ids, tiny_llama

HOOK = "model.layers.0"


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_llama()
    return model, tok


def _sae(tmp_path, d_in=64, d_sae=96, k=8, hook=HOOK, model_meta=None):
    torch.manual_seed(1)
    sae = make_sae(TopKConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_dec_D.copy_(torch.randn(d_in) * 0.1)
        sae.b_enc_F.copy_(torch.rand(d_sae) * 0.1)
    sae.save(tmp_path / "sae", metadata={"hook": hook, "model": model_meta or {"name": "tiny", "sha256": "abc"}})
    return load_sae(tmp_path / "sae")  # folded, input_scale 1


def test_no_edit_gives_bitwise_identical_logits(tiny, tmp_path):
    model, _ = tiny
    sae = _sae(tmp_path)
    ids = random_ids(2, 12)
    clean = model(ids).logits
    with intervene(model, [Edit(sae)], keep_error=True):
        edited = model(ids).logits
    assert torch.equal(clean, edited)
    # a scale of 1 goes through the edit path: x + (decode(f') - decode(f)) with f' = f is still exact
    with intervene(model, Edit(sae, scale={3: 1.0}), keep_error=True):
        assert torch.equal(clean, model(ids).logits)


def test_ablating_every_feature_keeps_only_b_dec_plus_error(tiny, tmp_path):
    model, _ = tiny
    sae = _sae(tmp_path)
    ids = random_ids(2, 10, seed=1)

    def error_only(x_BSD):  # x_new = decode(0) + (x - x_hat) = b_dec + x - x_hat
        x_BD = x_BSD.reshape(-1, x_BSD.shape[-1])
        x_hat_BD, _ = sae(x_BD)
        return (sae.b_dec_D + x_BD - x_hat_BD).reshape(x_BSD.shape)

    with splice(model, HOOK, error_only):
        ref = model(ids).logits
    with intervene(model, Edit(sae, ablate=range(sae.cfg.d_sae)), keep_error=True):
        got = model(ids).logits
    clean = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - clean).abs().max() > 1e-3  # the ablation did change something


def test_steering_moves_hook_activation_by_alpha_times_decoder_row(tiny, tmp_path):
    model, _ = tiny
    sae = _sae(tmp_path)
    ids = random_ids(2, 9, seed=2)
    clean = capture(model, [HOOK], ids)[HOOK]
    with intervene(model, Edit(sae, steer={7: 4.0}), keep_error=True):
        steered = capture(model, [HOOK], ids)[HOOK]
    assert torch.equal(steered, clean + 4.0 * sae.W_dec_FD[7])  # exact: one multiply, one add


def test_mask_leaves_other_positions_alone(tiny, tmp_path):
    model, _ = tiny
    sae = _sae(tmp_path)
    ids = random_ids(2, 8, seed=3)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 0] = False
    clean = capture(model, [HOOK], ids)[HOOK]
    with intervene(model, Edit(sae, steer={1: 2.0}), mask_BS=mask):
        got = capture(model, [HOOK], ids)[HOOK]
    assert torch.equal(got[:, 0], clean[:, 0])
    torch.testing.assert_close(got[:, 1:], clean[:, 1:] + 2.0 * sae.W_dec_FD[1], rtol=0, atol=1e-6)


def test_edit_delta_fast_path_matches_reference(tmp_path):
    sae = _sae(tmp_path)
    x = torch.randn(50, 64)
    f = sae.encode(x)
    active = f[0].nonzero()[:, 0].tolist()
    e = Edit(sae, ablate=active[:2], clamp={active[2]: 3.0, 90: 1.5}, scale={active[3]: 0.5, 5: 2.0})
    torch.testing.assert_close(edit_delta(e, x), edit_delta_reference(e, x), rtol=1e-5, atol=1e-6)
    assert edit_delta(e, x).abs().sum() > 0


def test_keep_error_false_splices_the_reconstruction(tmp_path):
    sae = _sae(tmp_path)
    x = torch.randn(20, 64)
    torch.testing.assert_close(apply_edit(Edit(sae), x, keep_error=False), sae(x)[0])
    e = Edit(sae, ablate=[0, 1, 2], steer={4: 1.0})
    f = sae.encode(x)
    f[:, [0, 1, 2]] = 0
    torch.testing.assert_close(apply_edit(e, x, keep_error=False), sae.decode(f) + sae.W_dec_FD[4],
                               rtol=1e-5, atol=1e-5)


def test_two_hooks_at_once(tmp_path):
    model, _ = tiny_llama(num_layers=2)
    sae0 = _sae(tmp_path / "a", hook="model.layers.0")
    sae1 = _sae(tmp_path / "b", hook="model.layers.1")
    ids = random_ids(1, 6)
    clean = capture(model, ["model.layers.0", "model.layers.1"], ids)
    with intervene(model, [Edit(sae0, steer={0: 1.0}), Edit(sae1, steer={2: -1.0})]):
        got = capture(model, ["model.layers.0", "model.layers.1"], ids)
    torch.testing.assert_close(got["model.layers.0"], clean["model.layers.0"] + sae0.W_dec_FD[0], rtol=0, atol=1e-6)
    # layer 1 = (layer 1 given the steered layer 0) - W_dec1[2]: both edits act in the same pass
    with intervene(model, Edit(sae0, steer={0: 1.0})):
        only0 = capture(model, ["model.layers.1"], ids)["model.layers.1"]
    torch.testing.assert_close(got["model.layers.1"], only0 - sae1.W_dec_FD[2], rtol=0, atol=1e-6)
    assert not torch.allclose(only0, clean["model.layers.1"], atol=1e-4)


def test_errors_are_usage_errors(tiny, tmp_path):
    model, _ = tiny
    sae = _sae(tmp_path)
    with pytest.raises(UsageError, match="out of range; the SAE has 96 features"):
        with intervene(model, Edit(sae, ablate=[96])):
            pass
    with pytest.raises(UsageError, match="not found in the model"):
        with intervene(model, Edit(sae, hook="model.layers.9", ablate=[1])):
            pass
    problems = check_sae_model(sae, {"name": "other", "sha256": "fff"}, "runs/x")
    assert len(problems) == 1 and "tiny" in problems[0] and "other" in problems[0]
    assert check_sae_model(sae, {"name": "tiny", "sha256": "abc"}) == []
    with pytest.raises(UsageError, match="feature:value"):
        parse_edits([sae], InterveneConfig(steer=["77"]))
    edits = parse_edits([sae, sae], InterveneConfig(ablate=["3", "1/4"], steer=["0/5:2.5"]))
    assert edits[0].ablate == [3] and edits[1].ablate == [3, 4]
    assert edits[0].steer == {5: 2.5} and edits[1].steer == {}


def _sequences(tmp_path, tok, n_docs=6, max_length=24):
    from saelab.corpus import resolve_corpus

    corpus = resolve_corpus(str(make_text_corpus(tmp_path / "corpus", n_docs=n_docs)))
    return list(pack_sequences(corpus.documents(), tok, max_length, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID))


def test_measure_effect_known_answers(tiny, tmp_path):
    model, tok = tiny
    sae = _sae(tmp_path)
    seqs = _sequences(tmp_path, tok)
    none = measure_effect(model, Edit(sae), seqs, tokenizer=tok, n_boot=200)
    assert none.delta_loss.estimate == 0.0 and none.kl == 0.0
    assert none.loss_clean == none.loss_edited

    eff = measure_effect(model, Edit(sae, steer={3: 8.0}), seqs, tokenizer=tok, n_boot=200)
    # clean loss equals token_losses averaged over the same valid predictions (BOS excluded, pad excluded)
    import numpy as np
    ids = torch.tensor(np.stack([s.input_ids for s in seqs]), dtype=torch.long)
    mask = torch.tensor(np.stack([s.attention_mask for s in seqs]))
    keep = torch.tensor(np.stack([s.keep_mask for s in seqs]))
    valid = keep[:, :-1] & mask[:, 1:].bool()
    losses = token_losses(model, ids, mask)
    assert eff.n_tokens == int(valid.sum())
    assert eff.loss_clean == pytest.approx(float(losses[valid].double().mean()), rel=1e-5)
    assert eff.kl > 0
    assert eff.delta_loss.low <= eff.delta_loss.estimate <= eff.delta_loss.high
    assert len(eff.increased) == 10 and eff.increased[0].delta_prob >= eff.increased[-1].delta_prob
    assert eff.decreased[0].delta_prob < 0
    # probability changes sum to zero over the vocabulary, so the biggest rise is matched by falls
    assert abs(sum(t.delta_prob for t in eff.increased)) > 0


def _save_tiny_model(tmp_path):
    model, tok = tiny_llama()
    d = tmp_path / "tiny-model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_effect_and_errors(tmp_path, capsys):
    from saelab.cli import main
    from saelab.models import load_model

    mdir = _save_tiny_model(tmp_path)
    info = load_model(str(mdir), quiet=True).info
    _sae(tmp_path / "good", model_meta={"name": info["name"], "sha256": info["sha256"]})
    _sae(tmp_path / "other", model_meta={"name": "SmolLM2-135M-Instruct.Q4_1", "sha256": "0123456789abcdef"})
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=4)
    good, other = str(tmp_path / "good" / "sae"), str(tmp_path / "other" / "sae")

    rc = main(["intervene", good, "--model", str(mdir), "--corpus", str(corpus), "--ablate", "1,2",
               "--steer", "3:2.0", "--tokens", "100", "--max-length", "32", "-q", "--n-boot", "100"])
    out = capsys.readouterr().out
    assert rc == 0 and "KL(clean || edited)" in out and "95% CI" in out

    rc = main(["intervene", good, "--model", str(mdir), "--prompt", "the model", "--max-new-tokens", "5",
               "--steer", "3:20", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "clean" in out and "edited" in out

    rc = main(["intervene", good, "--model", str(mdir), "--corpus", str(corpus), "--ablate", "500", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "out of range" in err and "96 features" in err and "Traceback" not in err

    rc = main(["intervene", other, "--model", str(mdir), "--corpus", str(corpus), "--ablate", "1", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "SmolLM2-135M-Instruct.Q4_1" in err and info["name"] in err and "Traceback" not in err

    rc = main(["intervene", good, "--model", str(mdir), "--corpus", str(corpus), "--ablate", "1", "-q",
               "--hook", "model.layers.7"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.layers.7" in err


def test_splice_leaves_bos_positions_bit_identical():
    from saelab.models import capture
    from saelab.saes import TopKConfig, make_sae

    model, _ = tiny_llama()
    sae = make_sae(TopKConfig(d_in=64, d_sae=128, k=4))
    ids = random_ids(batch=2, seq=12, seed=4)
    ids[:, 0] = BOS_ID
    ids[1, 6] = BOS_ID  # a document boundary inside the window
    model.config.bos_token_id = BOS_ID
    hooks = ["model.layers.0", "model.layers.1"]
    with torch.no_grad():
        clean = capture(model, hooks, ids, stop_early=False)
        left = {}
        with intervene(model, [Edit(sae, hook="model.layers.0", steer={3: 25.0}, ablate=[1, 2])], left=left):
            edited = capture(model, hooks, ids, stop_early=False)  # sees the spliced layer-0 output
    bos = ids == BOS_ID
    e0, c0 = edited["model.layers.0"], clean["model.layers.0"]
    assert torch.equal(e0[bos], c0[bos])  # BOS is never spliced, like in training
    assert not torch.allclose(e0[~bos], c0[~bos])  # every other position is
    # the window's first BOS attends only to itself, so it stays identical downstream too
    assert torch.equal(edited["model.layers.1"][:, 0], clean["model.layers.1"][:, 0])
    assert left["bos"] == 3
