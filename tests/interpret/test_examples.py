"""The store pass, contexts, token text, logit lens and the errors a user can hit."""
import numpy as np
import pytest
import torch

from saelab.errors import UsageError
from saelab.interpret import data as data_mod
from saelab.interpret.data import check_feature_ids, check_pair, load_or_compute_stats
from saelab.interpret.examples import (
    build_examples, feature_examples, final_norm_gain, load_store_tokenizer, logit_lens, model_logit_lens,
    token_texts,
)
from saelab.interpret.stats import PassConfig, quantile_examples
from saelab.saes import load_sae
from saelab.store import load_store
from tests.builders import HOSTILE, HOSTILE_VOCAB, relu_identity_sae


def open_all(c, **kw):
    sae, store = load_sae(c.sae), load_store(c.store)
    hook = check_pair(sae, store)
    res = load_or_compute_stats(sae, store, hook, PassConfig(top_k=5, reservoir=8, batch_size=7),
                                cache_dir=c.tmp / "cache", **kw)
    return sae, store, hook, res


def test_pass_over_store_matches_planted_answers(crafted):
    c = crafted
    _, _, _, res = open_all(c)
    st = res.stats
    assert st.num_tokens == 45
    assert st.count_F.tolist() == (c.f > 0).sum(0).tolist()
    assert st.count_F[2] == 0 and st.count_F[0] == 45
    for j in range(4):
        order = np.argsort(-c.f[:, j], kind="stable")[:5]
        n = min(5, int((c.f[:, j] > 0).sum()))
        assert st.top_index_FK[j, :n].tolist() == order[:n].tolist()
        np.testing.assert_allclose(st.top_values_FK[j, :n].numpy(), c.f[order[:n], j])
    # feature 0's top token: the last position of sequence 4 (value 5.8), global row 2*9 + 8
    assert st.top_index_FK[0, 0] == 26


def test_context_is_rebuilt_within_the_sequence(crafted):
    c = crafted
    sae, store, hook, _ = open_all(c)
    # row 9 = sequence 2 position 0 (first in its chunk after sequence 0); row 17 = seq 2 pos 8
    exs = build_examples(sae, store, hook, [(0, 9), (3, 17), (0, 40)], context=3)
    e = exs[0]
    assert (e.seq, e.pos, e.center) == (2, 0, 0)
    assert e.context_ids == c.seqs[2][:4]  # nothing from sequence 0 before it
    np.testing.assert_allclose(e.context_acts, c.f[9:13, 0], rtol=1e-6)
    e = exs[1]
    assert (e.seq, e.pos, e.center, e.token_id) == (2, 8, 3, c.seqs[2][8])
    assert e.context_ids == c.seqs[2][5:9]  # nothing from sequence 4 after it (same chunk? no: next chunk)
    np.testing.assert_allclose(e.context_acts, c.f[14:18, 3], rtol=1e-6)
    e = exs[2]  # shard 1: sequence 3 position 4 (rows 36..44)
    assert (e.seq, e.pos) == (3, 4) and e.context_ids == c.seqs[3][1:8]
    assert e.value == pytest.approx(c.f[40, 0])


def test_context_stops_at_a_sequence_boundary_inside_a_chunk(crafted):
    c = crafted
    sae, store, hook, _ = open_all(c)
    # chunk 0 of shard 0 holds sequences 0 (rows 0-8) and 2 (rows 9-17): row 8 is the end of sequence 0
    (e,) = build_examples(sae, store, hook, [(0, 8)], context=4)
    assert e.context_ids == c.seqs[0][4:9] and e.center == 4


def test_feature_examples_and_quantile_bands(crafted):
    c = crafted
    sae, store, hook, res = open_all(c)
    bands = quantile_examples(res.stats, bands=2, per_band=2)
    ex = feature_examples(sae, store, hook, res.stats, [0, 2], top_k=3, bands=bands, context=1)
    assert [e.index for e in ex[0]["top"]] == res.stats.top_index_FK[0, :3].tolist()
    assert ex[2] == {"top": [], "quant": [[], []]}
    for b, band in enumerate(ex[0]["quant"]):
        lo, hi = bands.edges_FQ2[0, b].tolist()
        assert band and all(lo <= e.value <= hi for e in band)
        assert all(e.value == pytest.approx(c.f[e.index, 0]) for e in band)


def test_cache_is_reused_and_keyed_by_store(crafted, monkeypatch):
    c = crafted
    _, _, _, first = open_all(c)
    monkeypatch.setattr(data_mod, "feature_pass", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    sae, store, hook, again = open_all(c)
    assert again.cache_dir == first.cache_dir and torch.equal(again.stats.top_index_FK, first.stats.top_index_FK)
    sub = store.subset([0])  # another selection of chunks -> another key -> computes
    with pytest.raises(AssertionError, match="recomputed"):
        load_or_compute_stats(sae, sub, hook, PassConfig(top_k=5, reservoir=8, batch_size=7), cache_dir=c.tmp / "cache")


def test_token_text_and_hostile_tokens_round_trip(crafted):
    c = crafted
    tok = load_store_tokenizer(load_store(c.store))
    texts = token_texts(tok, range(len(HOSTILE_VOCAB)))
    assert [texts[i] for i in range(8, len(HOSTILE_VOCAB))] == HOSTILE
    with pytest.raises(UsageError, match="outside the tokenizer's vocabulary"):
        token_texts(tok, [len(HOSTILE_VOCAB) + 3])


def test_errors_feature_range_other_model_and_width(crafted):
    c = crafted
    with pytest.raises(UsageError, match=r"feature id 4, -1 out of range.*d_sae=4.*0 \.\. 3"):
        check_feature_ids([1, 4, -1], 4)
    store = load_store(c.store)
    other = load_sae(relu_identity_sae(c.tmp / "other", 4, model_sha="f" * 64))
    with pytest.raises(UsageError, match="trained on activations of model tiny .sha256 ffffffff.*collected from tiny .sha256 000000"):
        check_pair(other, store)
    wide = load_sae(relu_identity_sae(c.tmp / "wide", 6))
    with pytest.raises(UsageError, match="has d_in 6, but hook 'model.layers.0' of store .* has width 4"):
        check_pair(wide, store)
    with pytest.raises(UsageError, match="reads hook 'model.layers.9', but store .* holds"):
        check_pair(load_sae(c.sae), store, "model.layers.9")
    sae = load_sae(c.sae)
    with pytest.raises(UsageError, match="not a row of store"):
        build_examples(sae, store, "model.layers.0", [(0, 45)], context=2)


def test_logit_lens_known_answer():
    W_dec_FD = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W_U_VD = torch.tensor([[1.0, 0.0], [-2.0, 0.2], [0.0, 3.0], [0.5, -1.0]])
    lens = logit_lens(W_dec_FD, W_U_VD, k=2)
    assert lens.top_ids_FK.tolist() == [[0, 3], [2, 1]]
    assert lens.bottom_ids_FK[0].tolist() == [1, 2] and lens.bottom_ids_FK[1].tolist() == [3, 0]
    # the final norm's gain reweights dimensions: with gain (1, 0) feature 1 reads nothing
    lens = logit_lens(W_dec_FD, W_U_VD, torch.tensor([1.0, 0.0]), k=1)
    assert lens.top_values_FK[1].tolist() == [0.0]  # all logits of feature 1 are 0
    with pytest.raises(UsageError, match="width 2 .* width 3"):
        logit_lens(W_dec_FD, torch.zeros(4, 3))


def test_logit_lens_through_a_real_tiny_model():
    from tests.builders import tiny_llama

    model, _ = tiny_llama()
    gain = final_norm_gain(model)
    assert gain is not None and gain.shape == (64,)
    W_dec = torch.randn(3, 64)
    lens = model_logit_lens(model, W_dec, k=4)
    ref = (W_dec * gain) @ model.lm_head.weight.detach().T
    assert lens.top_ids_FK.tolist() == ref.topk(4, dim=1).indices.tolist()


def test_massive_activation_rows_are_left_out_unless_kept(tmp_path):
    """One first-token row 400x the others (a massive activation, flagged by collect) would set
    feature 0's max and its top example; the pass leaves it out, as train and evaluate do."""
    from tests.builders import write_store

    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, len(HOSTILE_VOCAB), size=16).tolist() for _ in range(4)]
    acts = [np.abs(rng.normal(1.0, 0.1, size=(16, 4))).astype(np.float32) for _ in range(4)]
    acts[2][0] *= 400  # sequence 2, position 0: global row 32 (one shard, one chunk)
    store_dir = write_store(tmp_path / "store", seqs, acts, num_shards=1, seqs_per_chunk=4, outlier_ratio=5.0)
    sae, store = load_sae(relu_identity_sae(tmp_path / "sae", 4)), load_store(store_dir)
    hook = check_pair(sae, store)
    assert store.flagged_count(hook) == 1
    res = load_or_compute_stats(sae, store, hook, PassConfig(top_k=3), cache_dir=tmp_path / "cache")
    assert res.stats.num_tokens == 63 and res.meta["outlier_rows_left_out"] == 1
    assert float(res.stats.max_F[0]) < 2 and 32 not in res.stats.top_index_FK.flatten().tolist()
    assert 32 not in res.stats.sample_index_FR.flatten().tolist()
    assert int(res.stats.count_F[0]) == 63
    kept = load_or_compute_stats(sae, store, hook, PassConfig(top_k=3, keep_outliers=True), cache_dir=tmp_path / "cache")
    assert kept.cache_dir != res.cache_dir  # a different setting, a different cache entry
    assert kept.stats.num_tokens == 64 and kept.meta["outlier_rows_left_out"] == 0
    assert float(kept.stats.max_F[0]) > 100 and int(kept.stats.top_index_FK[0, 0]) == 32
