"""Autointerp on planted features: prompts, scores with the rule backend, metrics, caching and resume.

The planted store (`planted_words` in tests/builders.py) has features that fire exactly on one word, so the rule
explainer must name that word, the rule scorer must then score 1, and the shuffled baseline ~0.5.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saelab.cli import main
from saelab.errors import UsageError
from saelab.interpret.autointerp import (
    AutointerpConfig, Context, auroc, binary_scores, derangement, explain_prompt, render, run_autointerp,
)
from saelab.interpret.autointerp.prompts import parse_explanation, parse_yes_no
from saelab.interpret.autointerp.sampling import misplace_marks, sample_contexts
from saelab.statistics import rankdata
from tests.builders import PLANTED_WORDS as WORDS

RULE = AutointerpConfig(explainer="rule", scorer="rule")
REPO = Path(__file__).resolve().parents[2]


def test_render_marks_runs_and_neutralises_delimiters():
    ctx = Context(["a", " b", " c", "<<x>>", "\n"], [0, 2, 1, 3, 0], [False, True, True, True, False], 7)
    assert render(ctx) == "a<< b c‹‹x››>>↵"
    assert render(ctx, marks=False) == "a b c‹‹x››↵"


def test_prompts_contain_the_marked_examples(planted):
    p = planted
    ctxs = sample_contexts(p.sae_obj, p.store_obj, p.hook, p.res.stats, [1], p.tok, n_top=5, bands=2, n_test=4,
                           context=3)
    c = ctxs[1]
    assert len(c.explain) == 7 and len(c.active) == 4 and len(c.inactive) == 4
    user = explain_prompt(c.explain).messages[-1]["content"]
    for i, ctx in enumerate(c.explain):
        assert f"{i + 1}. {render(ctx)}\n" in user + "\n"
        # exactly the planted word is marked, and it is always marked
        assert [t for t, m in zip(ctx.tokens, ctx.marked) if m] == [t for t in ctx.tokens if t == WORDS[1]]
    assert user.count("<< cat") >= 7
    assert all(max(x.acts) == 0 and " cat" not in x.tokens for x in c.inactive)
    assert all(" cat" in x.tokens for x in c.active)
    held = {x.index for x in c.active}
    assert held.isdisjoint(x.index for x in c.explain)  # held out from the explanation


def test_rule_backend_scores_planted_features_near_one_and_shuffled_near_chance(planted, tmp_path):
    p = planted
    r = run_autointerp(p.sae_obj, p.store_obj, p.hook, p.res.stats, [1, 2, 3, 4, 5], RULE, tmp_path / "out",
                       tokenizer=p.tok, quiet=True)
    assert r.skipped == [5] and sorted(r.records) == [1, 2, 3, 4]
    for f, rec in r.records.items():
        assert rec["explanation"] == f'the word "{WORDS[f].strip()}"'
        for task in ("detection", "fuzzing"):
            assert rec["scores"][task]["balanced_accuracy"] == 1.0
            assert rec["scores"][task]["auroc"] == 1.0
        assert rec["shuffled"]["source"] != f
    s = r.summary
    for task in ("detection", "fuzzing"):
        assert s[task]["balanced_accuracy"]["real"]["mean"] == 1.0
        assert abs(s[task]["balanced_accuracy"]["shuffled"]["mean"] - 0.5) < 0.15
        assert s[task]["balanced_accuracy"]["difference"]["low"] > 0.25
    run = json.loads((tmp_path / "out" / "autointerp.json").read_text())
    assert run["features"] == [1, 2, 3, 4] and run["skipped"] == [5]


def test_binary_scores_known_answers():
    y = [True, True, True, False, False]
    s = binary_scores(y, [True, False, None, False, True], [0.9, 0.4, 0.4, 0.4, 0.6])
    assert s["balanced_accuracy"] == pytest.approx(0.5 * (1 / 3 + 1 / 2))
    # positives 0.9, 0.4, 0.4 vs negatives 0.4, 0.6: 0.9 wins twice, each 0.4 ties once -> (2 + 2 x 0.5) / 6
    assert s["auroc"] == pytest.approx(3 / 6) and s["auroc_from"] == "probabilities" and s["unparsed"] == 1
    hard = binary_scores(y, [True, True, False, False, True], [None] * 5)
    assert hard["auroc"] == pytest.approx(hard["balanced_accuracy"]) and hard["auroc_from"] == "answers"
    assert math.isnan(binary_scores([True], [True], [1.0])["balanced_accuracy"])
    rng = np.random.default_rng(0)
    sc, lab = rng.random(50).round(1), rng.random(50) < 0.4
    pos, neg = sc[lab], sc[~lab]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auroc(sc, lab) == pytest.approx(brute)
    assert rankdata([3, 1, 3]).tolist() == [2.5, 1, 2.5]


def test_derangement_never_keeps_a_feature():
    for seed in range(20):
        d = derangement([4, 9, 11], seed)
        assert sorted(d.values()) == [4, 9, 11] and all(k != v for k, v in d.items())
    assert derangement([3]) == {}


def test_parsers_and_misplaced_marks():
    assert parse_explanation("Sure!\nExplanation: the word \"cat\".\n") == 'the word "cat".'
    assert parse_explanation('"plural nouns"') == "plural nouns"
    assert parse_yes_no(" Yes.") is True and parse_yes_no("no") is False and parse_yes_no("Maybe") is None
    ctx = Context(list("abcdef"), [0, 2, 0, 0, 1, 0], [False, True, False, False, True, False], 0)
    w = misplace_marks(ctx, np.random.default_rng(0))
    assert sum(w.marked) == 2 and not any(m and a > 0 for m, a in zip(w.marked, w.acts))
    assert misplace_marks(ctx._replace(acts=[1] * 6), np.random.default_rng(0)) is None


def test_cache_is_reused_and_other_settings_recompute(planted, tmp_path):
    p, out = planted, tmp_path / "out"
    args = (p.sae_obj, p.store_obj, p.hook, p.res.stats, [1, 2])
    first = run_autointerp(*args, RULE, out, tokenizer=p.tok, quiet=True)
    files = {f: f.read_bytes() for f in sorted((out / "features").glob("*.json"))}
    again = run_autointerp(*args, RULE, out, tokenizer=p.tok, quiet=True)
    assert {f: f.read_bytes() for f in files} == files
    run = json.loads((out / "autointerp.json").read_text())
    assert run["reused"] == {"explanations": 2, "scores": 2} and again.summary == first.summary
    other = AutointerpConfig(explainer="rule", scorer="rule", n_test=4)
    run_autointerp(*args, other, out, tokenizer=p.tok, quiet=True)
    assert json.loads((out / "autointerp.json").read_text())["reused"] == {"explanations": 0, "scores": 0}
    assert len(json.loads(next(iter(files)).read_text())["items"]["detection"]["labels"]) == 8


def _cli(p, out, *extra):
    return [sys.executable, "-m", "saelab", "autointerp", str(p.sae), "--data", str(p.store), "--out", str(out),
            "--cache-dir", str(p.tmp / "cache"), "--feature-ids", "1-4", "--explainer", "rule", "-q", *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(planted, tmp_path):
    p = planted
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(p, out, "--scorer", "rule:0.03"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline, scored = time.time() + 180, 0
    while time.time() < deadline and proc.poll() is None:
        recs = [json.loads(f.read_text()) for f in (out / "features").glob("*.json")] if out.exists() else []
        scored = sum("scores" in r for r in recs)
        if scored >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "autointerp.json").exists()
    done = {f.name: f.read_bytes() for f in (out / "features").glob("*.json")
            if "scores" in json.loads(f.read_text())}
    assert 1 <= len(done) < 4
    assert main(_cli(p, out, "--scorer", "rule")[3:]) == 0
    run = json.loads((out / "autointerp.json").read_text())
    assert run["reused"]["explanations"] == 4 and run["reused"]["scores"] == len(done)
    for name, data in done.items():  # finished steps were not redone
        old, new = json.loads(data), json.loads((out / "features" / name).read_text())
        assert new["scores"] == old["scores"] and new["items"] == old["items"]
    ref = tmp_path / "uninterrupted"
    assert main(_cli(p, ref, "--scorer", "rule")[3:]) == 0
    for f in sorted((ref / "features").glob("*.json")):
        assert (out / "features" / f.name).read_bytes() == f.read_bytes()
    assert not list((out / "features").glob("*.tmp"))


def test_cli_dry_run_prints_prompts_and_writes_nothing(planted, tmp_path, capsys):
    p = planted
    assert main(_cli(p, tmp_path / "o", "--scorer", "rule", "--dry-run")[3:]) == 0
    text = capsys.readouterr().out
    assert "===== explain prompt =====" in text and "<< cat>>" in text and "detect prompt" in text
    assert not (tmp_path / "o").exists()


def test_bad_input_is_a_usage_error(planted, tmp_path, capsys):
    p = planted
    assert main(_cli(p, tmp_path / "o", "--n_test", "0")[3:]) == 2
    assert "n_test must be >= 1" in capsys.readouterr().err
    assert main(_cli(p, tmp_path / "o", "--scorer", "rule:fast")[3:]) == 2
    assert "rule:SECONDS" in capsys.readouterr().err
    with pytest.raises(UsageError, match="none of the requested features fired"):
        run_autointerp(p.sae_obj, p.store_obj, p.hook, p.res.stats, [5], RULE, tmp_path / "o", tokenizer=p.tok)
