"""saelab.experiments.reasoning: token classes, enrichment, the frequency-matched control, the dry run."""
import json

import numpy as np
import pytest

from saelab.experiments.reasoning import (
    CALC, EXPL, OTHER, Config, classify_tokens, enrichment, frequency_bins, matched_control, run, top_enriched,
)


def test_classify_tokens_known_answer():
    texts = ["So", " we", " get", " $", "x", " +", " 2", "$", " and", " 3", " ", ",", "\\(", "y", "\\)", " thus"]
    want = [EXPL, EXPL, EXPL, CALC, CALC, CALC, CALC, CALC, EXPL, CALC, OTHER, OTHER, CALC, CALC, CALC, EXPL]
    assert classify_tokens(texts).tolist() == want


def test_enrichment_recovers_planted_features():
    rng = np.random.default_rng(0)
    n_a = n_b = 20_000
    base = rng.uniform(0.001, 0.05, size=200)
    k_a, k_b = rng.binomial(n_a, base), rng.binomial(n_b, base)
    k_a[[7, 42, 99]] = rng.binomial(n_a, base[[7, 42, 99]] * 6)  # planted: 6x more often in corpus a
    e = enrichment(k_a, n_a, k_b, n_b)
    assert set(top_enriched(e, 3, alpha=0.05)) == {7, 42, 99}
    assert set(top_enriched(e, 50, alpha=0.05)) == {7, 42, 99}  # nothing else survives BH
    assert np.all(e.q >= e.p)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matched_control_really_matches_frequencies(seed):
    rng = np.random.default_rng(10)
    freq = 10 ** rng.uniform(-5, -0.5, size=2000)
    freq[:50] = 0.0  # dead features must never be drawn
    chosen = list(np.argsort(-freq)[:10]) + list(np.argsort(-freq)[900:910])  # high and middle frequencies
    ctrl = matched_control(freq, chosen, n_bins=10, seed=seed)
    bins = frequency_bins(freq, 10)
    assert bins[ctrl].tolist() == bins[chosen].tolist()
    assert len(set(ctrl.tolist())) == len(ctrl) and not set(ctrl.tolist()) & set(chosen)
    assert np.all(freq[ctrl] > 0)
    # matched within a bin: mean log10 frequency within 0.25 decades of the chosen set's
    assert abs(np.log10(freq[ctrl]).mean() - np.log10(freq[chosen]).mean()) < 0.25
    # and far from what an unmatched random draw gives
    assert abs(np.log10(freq[freq > 0]).mean() - np.log10(freq[chosen]).mean()) > 0.5
    assert not np.array_equal(ctrl, matched_control(freq, chosen, n_bins=10, seed=seed + 100))


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning")
    return out, run(Config(), out, dry_run=True, quiet=True)


def test_dry_run_writes_report_and_matched_controls(dry):
    out, res = dry
    for f in ("results.json", "report.md", "enrichment.png", "complexity.png", "categories.png", "ablation.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["enrichment"]["n_reasoning_enriched"] > 0
    ab = saved["ablation"]
    assert len(ab["controls"]) == 2 and len(ab["features"]) == 4
    for bins in ab["frequency_match"]["control_bins"]:
        assert bins == ab["frequency_match"]["chosen_bins"]
    d = ab["top"]["reasoning"]["delta_loss"]
    assert d["low"] <= d["estimate"] <= d["high"]
    assert set(saved["complexity"]["by_category"]) == {"Number-Theory", "Polynomial", "Sequence"}
    assert saved["calc_vs_expl"]["n_calc"] > 0 and saved["calc_vs_expl"]["n_expl"] > 0
    assert "## 4. Causal ablation" in (out / "report.md").read_text()


def test_cli_missing_corpus_gives_fetch_message(dry, tmp_path, monkeypatch, capsys):
    from saelab.cli import main

    out, res = dry
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "home"))
    rc = main(["experiment", "reasoning", "--sae", res["config"]["sae"], "--model", res["config"]["model"],
               "--out", str(tmp_path / "o"), "--reasoning-corpus", "champ-cot", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "saelab corpora fetch champ-cot" in err and "Traceback" not in err
    rc = main(["experiment", "reasoning", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2 and "--sae" in capsys.readouterr().err


def test_documents_are_read_in_a_seeded_random_order(tmp_path):
    """Grouped corpora (champ-cot: ~90 replies per problem in a row) must be sampled across the whole
    corpus: the experiment shuffles documents with its seed unless told not to."""
    import random

    from saelab.experiments.reasoning import _sequences
    from tests.builders import BOS_ID, EOS_ID, PAD_ID, make_text_corpus, tiny_tokenizer

    tok = tiny_tokenizer()
    corpus = make_text_corpus(tmp_path / "c", n_docs=8, seed=5, words=(3, 6))
    docs = [tok(p.read_text(), add_special_tokens=False)["input_ids"] for p in sorted(corpus.glob("*.txt"))]

    def stream(seqs):  # the packed token stream, document by document
        ids = [i for s in seqs for i in s.input_ids.tolist() if i != PAD_ID]
        out, cur = [], []
        for i in ids:
            if i == EOS_ID:
                out.append(cur)
                cur = []
            elif i != BOS_ID:
                cur.append(i)
        return out

    assert stream(_sequences(str(corpus), tok, 16)) == docs
    order = list(range(len(docs)))
    random.Random(3).shuffle(order)
    assert order != sorted(order)
    assert stream(_sequences(str(corpus), tok, 16, shuffle_seed=3)) == [docs[i] for i in order]
