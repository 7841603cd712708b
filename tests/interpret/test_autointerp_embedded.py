"""Autointerp with the embedded SmolLM2-135M-Instruct as explainer and scorer, on the planted store (slow).

What must hold whatever the small model answers: every live feature gets a non-empty explanation
and both scores, computed from probabilities (a local model always has them); the shuffled baseline
is there; and a prompt's P(yes) does not depend on which other prompts share its padded batch.
"""
import pytest
import torch

from saelab.interpret.autointerp import AutointerpConfig, LocalBackend, detect_prompt, run_autointerp
from saelab.interpret.autointerp.sampling import sample_contexts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_embedded_model_explains_and_scores_planted_features(planted, tmp_path):
    p = planted
    sae, store, hook, res = p.sae_obj, p.store_obj, p.hook, p.res
    cfg = AutointerpConfig(explainer="default", scorer="default", n_top=4, bands=1, n_test=4, context=4,
                           max_new_tokens=24)
    r = run_autointerp(sae, store, hook, res.stats, [1, 4], cfg, tmp_path / "out", tokenizer=p.tok, quiet=True)
    assert sorted(r.records) == [1, 4]
    for rec in r.records.values():
        assert isinstance(rec["explanation"], str) and rec["explanation"].strip()
        for part in (rec, rec["shuffled"]):
            for task in ("detection", "fuzzing"):
                s = part["scores"][task]
                assert s["auroc_from"] == "probabilities" and s["n_pos"] == 4
                assert 0.0 <= s["balanced_accuracy"] <= 1.0 and 0.0 <= s["auroc"] <= 1.0
                assert all(0.0 < q < 1.0 for q in part["items"][task]["p_yes"])
    for task in ("detection", "fuzzing"):
        assert r.summary[task]["auroc"]["shuffled"]["n"] == 2


def test_p_yes_does_not_depend_on_the_batch(planted):
    p = planted
    sae, store, hook, res = p.sae_obj, p.store_obj, p.hook, p.res
    c = sample_contexts(sae, store, hook, res.stats, [1], p.tok, n_top=2, bands=1, n_test=3, context=6)[1]
    prompts = [detect_prompt('the word "cat"', x) for x in c.active + c.inactive]
    lb = LocalBackend("default", batch_size=8)
    together = [j.p_yes for j in lb.classify(prompts)]
    alone = [lb.classify([q])[0].p_yes for q in prompts]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=2e-3, rtol=0)
