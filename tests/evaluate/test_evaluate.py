"""evaluate.py end to end on tiny stores and the tiny Llama: hand-computed answers, splices, bad input."""
import json
import math

import numpy as np
import pytest
import torch

from saelab import metrics as M
from saelab.errors import UsageError
from saelab.evaluate import accumulate, downstream, evaluate_saes, summarise
from tests.builders import HOOK, MODEL_SHA, const_sae, hand_sae, identity_sae, store_from_rows as make_store

def fp16_data(n=300, d=4, offset=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) + offset).half().float()  # exactly what the store holds


# --------------------------------------------------------------------------- reconstruction, sparsity


def _result(sae, x_ND, batch=64):
    [sums], rows = accumulate([sae], x_ND.split(batch))
    return summarise("sae", "", sae, HOOK, "all", sums, rows)


def test_perfect_sae_has_fvu_zero():
    x = fp16_data()
    res = _result(identity_sae(4), x)
    assert res.fvu == 0.0 and res.mse == 0.0
    assert res.cosine == pytest.approx(1.0, abs=1e-6) and res.rel_norm == pytest.approx(1.0, abs=1e-6)
    assert res.rel_error == 0.0
    assert res.l0 == pytest.approx(4.0)  # each dimension is non-zero: one of the +/- pair fires


def test_mean_sae_has_fvu_one_and_zero_sae_does_not_on_uncentred_data():
    x = fp16_data(offset=3.0)
    mean = x.double().mean(0)
    res = _result(const_sae(4, mean.float()), x)
    assert res.fvu == pytest.approx(1.0, abs=1e-6)
    assert res.dead == 4 and res.l0 == 0.0
    zero = _result(const_sae(4, torch.zeros(4)), x)
    expect = float(x.double().pow(2).sum() / (x.double() - mean).pow(2).sum())
    assert zero.fvu == pytest.approx(expect, rel=1e-6)
    assert zero.fvu > 5  # about zero it would be 1: FVU is measured about the mean
    xc = x - x.mean(0)
    assert _result(const_sae(4, torch.zeros(4)), xc).fvu == pytest.approx(1.0, abs=1e-6)


def test_batch_size_does_not_change_metrics():
    x = fp16_data(n=257)
    g = torch.Generator().manual_seed(1)
    sae = hand_sae(torch.randn(4, 12, generator=g), torch.randn(12, 4, generator=g))
    a, b = _result(sae, x, batch=1), _result(sae, x, batch=256)
    for f in ("mse", "fvu", "cosine", "rel_norm", "l0", "dead", "dense"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-6), f  # BLAS differs by batch
    assert a.l0_hist == b.l0_hist


def test_dead_and_dense_counts_on_a_crafted_set():
    # 100 tokens in 4 dims; latent j = relu(x_j) (W_enc = I). Dim 0 positive on all tokens, dim 1 on 10
    # (exactly 10%: not dense), dim 2 on 11, dim 3 never; latents 4 and 5 have b_enc = -1 and never fire.
    x = torch.zeros(100, 4)
    x[:, 0] = 1.0
    x[:10, 1] = 2.0
    x[50:61, 2] = 0.5
    x[:, 3] = -1.0
    W_enc = torch.cat([torch.eye(4), torch.zeros(4, 2)], 1)
    sae = hand_sae(W_enc, torch.randn(6, 4), b_enc_F=torch.tensor([0, 0, 0, 0, -1.0, -1.0]))
    res = _result(sae, x, batch=7)
    assert (res.dead, res.dense) == (3, 2)
    assert res.dead_frac == pytest.approx(0.5) and res.dense_frac == pytest.approx(1 / 3)
    assert res.l0 == pytest.approx((100 + 10 + 11) / 100)
    assert res.l0_hist == [0, 79, 21]
    assert res.density_hist["dead"] == 3 and sum(res.density_hist["counts"]) == 3


def test_geometry_of_a_known_decoder():
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    res = _result(hand_sae(torch.zeros(2, 3), W_dec), fp16_data(n=10, d=2))
    assert res.decoder_norm_min == pytest.approx(1.0) and res.decoder_norm_max == pytest.approx(math.sqrt(18))
    assert res.max_cos_max == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert res.max_cos_mean == pytest.approx(1 / math.sqrt(2), abs=1e-6)


# --------------------------------------------------------------------------- through a store


def test_evaluate_store_writes_outputs(tmp_path):
    x = fp16_data(n=300)
    store = make_store(tmp_path / "store", x)
    sae_a = identity_sae(4)
    sae_b = const_sae(4, x.mean(0))
    sae_a.save(tmp_path / "a")
    sae_b.save(tmp_path / "b")
    results = evaluate_saes([tmp_path / "a", tmp_path / "b"], store, split="all", batch_size=50,
                       out=tmp_path / "out", quiet=True)
    assert [r.name for r in results] == ["a", "b"]
    assert results[0].n_tokens == 300 and results[0].fvu == 0.0
    assert results[1].fvu == pytest.approx(1.0, abs=1e-5)
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert data["results"][1]["fvu"] == pytest.approx(results[1].fvu)
    assert data["results"][0] == results[0].to_dict()
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| a |" in md and "| b |" in md
    for png in ("pareto_l0_fvu.png", "feature_density.png", "a/feature_density.png", "b/max_cos.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # --tokens stops early and the result does not depend on the read batch size
    r1 = evaluate_saes([tmp_path / "b"], store, split="all", tokens=123, batch_size=7, quiet=True)[0]
    r2 = evaluate_saes([tmp_path / "b"], store, split="all", tokens=123, batch_size=4096, quiet=True)[0]
    assert r1.n_tokens == r2.n_tokens == 123
    assert r1.fvu == pytest.approx(r2.fvu, rel=1e-9) and r1.mse == pytest.approx(r2.mse, rel=1e-9)


def test_mismatched_hook_width_and_model_name_both_sides(tmp_path):
    store = make_store(tmp_path / "store", fp16_data(n=40), model_sha="sha-store")
    wrong_hook = identity_sae(4, hook="model.layers.1", model_sha="sha-store")
    wrong_width = identity_sae(6, model_sha="sha-store")
    wrong_model = identity_sae(4, model_sha="sha-other")
    with pytest.raises(UsageError) as e:
        evaluate_saes([wrong_hook, wrong_width, wrong_model], store, split="all", quiet=True)
    msg = str(e.value)
    assert "'model.layers.1'" in msg and "'model.layers.0'" in msg
    assert "d_in 6" in msg and "width 4" in msg
    assert "sha-other"[:12] in msg and "sha-store"[:12] in msg


def test_tiny_and_empty_splits_give_a_clear_message(tmp_path):
    store = make_store(tmp_path / "one", fp16_data(n=1))
    with pytest.raises(UsageError, match=r"only 1 token\(s\).*at least 2"):
        evaluate_saes([identity_sae(4)], store, split="all", quiet=True)
    store = make_store(tmp_path / "single_chunk", fp16_data(n=40), chunk=64)  # one chunk: no val split
    with pytest.raises(UsageError, match=r"only 0 token\(s\).*--split all"):
        evaluate_saes([identity_sae(4)], store, split="val", quiet=True)
    const = make_store(tmp_path / "const", np.ones((10, 4)))
    with pytest.raises(UsageError, match="do not vary"):
        evaluate_saes([identity_sae(4)], const, split="all", quiet=True)


# --------------------------------------------------------------------------- downstream


def _sequences(n_seq=6, seq=16, seed=0):
    """Packed-sequence records as corpus.pack_sequences makes them: BOS first, padding at the end."""
    from tests.builders import BOS_ID, PAD_ID, random_ids

    ids = random_ids(n_seq, seq, seed=seed).numpy()
    ids[:, 0] = BOS_ID
    mask = np.ones_like(ids)
    ids[-1, 10:] = PAD_ID
    mask[-1, 10:] = 0
    keep = (mask == 1) & (ids != BOS_ID)
    from saelab.corpus import PackedSequence

    return [PackedSequence(i, ids[i], mask[i], keep[i]) for i in range(n_seq)]


def test_identity_splice_gives_exactly_the_clean_loss():
    from saelab.models import token_losses
    from tests.builders import tiny_llama

    model, _ = tiny_llama()
    d = model.config.hidden_size
    mean_D = torch.randn(d)
    saes = [identity_sae(d), const_sae(d, torch.zeros(d)), const_sae(d, mean_D)]
    seqs = _sequences()
    out = downstream(model, seqs, {HOOK: saes}, {HOOK: mean_D}, max_tokens=10_000, seq_batch=4)
    (ce_id, kl_id), (ce_zero_sae, _), (ce_mean_sae, kl_mean) = out["sae"][HOOK]
    assert ce_id == out["clean"] and kl_id == 0.0
    assert M.ce_loss_recovered(out["clean"], ce_id, out["zero"][HOOK]) == 1.0
    assert ce_zero_sae == out["zero"][HOOK]  # a zero SAE is zero-ablation: recovered 0
    assert ce_mean_sae == out["mean"][HOOK] and kl_mean > 0
    assert out["zero"][HOOK] != out["clean"]  # so the equalities above are not vacuous
    # clean CE against models.token_losses over the same predictions (not from BOS, not onto padding)
    ids = torch.tensor(np.stack([s.input_ids for s in seqs]))
    mask = torch.tensor(np.stack([s.attention_mask for s in seqs]))
    keep = torch.tensor(np.stack([s.keep_mask for s in seqs]))
    valid = keep[:, :-1] & mask[:, 1:].bool()
    with torch.no_grad():
        ref = token_losses(model, ids, mask)[valid].double().mean()
    assert out["n"] == int(valid.sum()) == 5 * 14 + 8
    assert out["clean"] == pytest.approx(float(ref), rel=1e-6)


def test_splice_leaves_excluded_positions_alone():
    from tests.builders import tiny_llama

    model, _ = tiny_llama()
    d = model.config.hidden_size
    seqs = _sequences(n_seq=2)
    for s in seqs:
        s.keep_mask = np.zeros_like(s.keep_mask)
        s.keep_mask[:3] = True  # predictions from positions 1, 2 only; splice touches positions 0..2
        s.keep_mask[0] = False
    out = downstream(model, seqs, {HOOK: [const_sae(d, torch.zeros(d))]}, {HOOK: torch.zeros(d)},
                     max_tokens=100, seq_batch=2)
    assert out["n"] == 4
    # zeroing positions 1-2 changes the loss there, but a zero SAE and zero-ablation stay identical
    assert out["sae"][HOOK][0][0] == out["zero"][HOOK] != out["clean"]


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate(tmp_path, capsys):
    from saelab.cli import main

    x = fp16_data(n=100)
    store = make_store(tmp_path / "store", x)
    identity_sae(4).save(tmp_path / "sae")
    rc = main(["evaluate", str(tmp_path / "sae"), "--data", str(store), "--split", "all", "--out",
               str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "100 tokens" in printed
    assert (tmp_path / "out" / "eval.json").is_file()
    identity_sae(4, hook="model.layers.9").save(tmp_path / "other")
    rc = main(["evaluate", str(tmp_path / "other"), "--data", str(store), "--split", "all", "--quiet"])
    assert rc == 2
    assert "model.layers.9" in capsys.readouterr().err


def test_pareto_front_and_summary_text():
    from saelab.evaluate.report import markdown_table, summary_text
    from saelab.plots import pareto_front

    # (L0, FVU): point 2 is dominated by point 1 (more latents, worse FVU); NaN is skipped
    assert pareto_front([16, 32, 64, 48, float("nan")], [0.3, 0.2, 0.1, 0.25, 0.0]) == [0, 1, 2]
    assert pareto_front([16, 32, 64], [0.5, 0.9, 0.8], higher_is_better=True) == [0, 1]
    res = _result(identity_sae(4), fp16_data(n=20))
    text = summary_text([res])
    assert "FVU" in text and "CE" not in text  # no downstream columns without downstream numbers
    assert markdown_table([res]).count("\n") == 2


def test_evaluate_downstream_with_model_and_corpus(tmp_path):
    from saelab.models import LoadedModel
    from tests.builders import make_text_corpus, tiny_llama

    model, tok = tiny_llama()
    d = model.config.hidden_size
    loaded = LoadedModel(model=model, tokenizer=tok, info={"name": "tiny", "sha256": MODEL_SHA})
    store = make_store(tmp_path / "store", fp16_data(n=80, d=d))
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=4)
    res = evaluate_saes([identity_sae(d), const_sae(d, torch.zeros(d))], store, split="all", model=loaded,
                   corpus=str(corpus), eval_tokens=40, seq_batch=2, out=tmp_path / "out", quiet=True)
    assert res[0].ce_recovered == 1.0 and res[0].kl == 0.0 and res[0].ce_sae == res[0].ce_clean
    assert res[1].ce_recovered == 0.0 and res[1].ce_sae == res[1].ce_zero
    assert res[0].downstream_tokens >= 40
    assert (tmp_path / "out" / "pareto_l0_ce_recovered.png").is_file()
    other = LoadedModel(model=model, tokenizer=tok, info={"name": "bigger", "sha256": "sha-bigger"})
    with pytest.raises(UsageError, match="bigger.*tiny|tiny.*bigger"):
        evaluate_saes([identity_sae(d)], store, split="all", model=other, corpus=str(corpus), quiet=True)


# --------------------------------------------------------------------------- outliers cannot decide the metrics


def test_per_token_relative_error_by_hand():
    # x_hat = b_dec = (1, 0) for every token: errors (0,1), (1,1), (2,0) on x = (1,1), (2,1), (3,0)
    x = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 0.0]])
    res = _result(const_sae(2, torch.tensor([1.0, 0.0])), x)
    expect = (1 / 2**0.5 + 2**0.5 / 5**0.5 + 2 / 3) / 3
    assert res.rel_error == pytest.approx(expect, rel=1e-6)


def test_a_planted_massive_row_is_left_out_reported_and_warned_about(tmp_path, caplog):
    from saelab.store import ShardWriter
    from tests.builders import id_store_meta

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g) + 3
    x[123] *= 400  # one massive row: alone it holds almost all the variance
    meta = id_store_meta(hooks=[{"name": HOOK, "width": 4}], model={"name": "tiny", "sha256": MODEL_SHA},
                         outlier_ratio=5.0)
    with ShardWriter.open(tmp_path / "s", meta, 0, 1) as w:
        w.write_chunk(np.arange(400, dtype=np.int32), np.stack([np.arange(400) // 16, np.arange(400) % 16], 1).astype(np.int32),
                      {HOOK: x.numpy()}, sequences_done=25, batches_done=1)
        w.finish()
    eye = torch.eye(4)
    sae = hand_sae(torch.cat([eye, -eye], 1), 0.9 * torch.cat([eye, -eye], 0))  # x_hat = 0.9 x
    with caplog.at_level("WARNING"):
        (kept,) = evaluate_saes([sae], tmp_path / "s", split="all", keep_outliers=True, quiet=True)
    assert "top 1% of rows hold" in caplog.text  # the massive row decides FVU: say so
    caplog.clear()
    with caplog.at_level("WARNING"):
        (res,) = evaluate_saes([sae], tmp_path / "s", split="all", quiet=True)
    assert "top 1% of rows hold" not in caplog.text
    assert res.flagged == 1 and res.n_tokens == 399
    # the massive row swamps the sums: FVU drops ~10x when it counts; the per-token error does not move
    assert res.fvu_with_outliers == pytest.approx(kept.fvu) and res.fvu > 5 * kept.fvu
    assert res.rel_error == pytest.approx(0.1, rel=1e-3) and kept.rel_error == pytest.approx(0.1, rel=1e-3)
    assert res.variance_share_top["0.01"] < 0.1 < kept.variance_share_top["0.01"]
    assert len(res.rel_error_by_position) == 16 and res.rel_error_by_position[0] is not None
