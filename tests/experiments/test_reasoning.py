"""saelab.experiments.reasoning: splits, notation share, planted claims, batched ablation, the dry run."""
import json

import numpy as np
import pytest
import torch

from saelab.experiments import reasoning_analysis as A
from saelab.experiments import reasoning_passes as P
from saelab.experiments.reasoning import Config, run
from saelab.experiments.reasoning_data import load_champ, split_documents, split_problems, write_mixed_corpus


def test_enrichment_recovers_planted_features():
    rng = np.random.default_rng(0)
    n_a = n_b = 20_000
    base = rng.uniform(0.001, 0.05, size=200)
    k_a, k_b = rng.binomial(n_a, base), rng.binomial(n_b, base)
    k_a[[7, 42, 99]] = rng.binomial(n_a, base[[7, 42, 99]] * 6)  # planted: 6x more often in corpus a
    e = A.enrichment(k_a, n_a, k_b, n_b)
    assert set(A.top_enriched(e, 3, alpha=0.05)) == {7, 42, 99}
    assert set(A.top_enriched(e, 50, alpha=0.05)) == {7, 42, 99}  # nothing else survives BH
    assert np.all(e.q >= e.p)


def test_math_share_known_answers():
    assert A.math_share("We count the ways.") == 0.0
    assert A.math_share("$x+1$") == 1.0
    # "so" (2) + "$a=2$" (5 notation chars) + "ok" (2): 5 / 9
    assert A.math_share("so $a=2$ ok") == pytest.approx(5 / 9)
    assert A.math_share("3 + 4") == 1.0 and A.math_share("") == 0.0


def test_split_problems_is_a_seeded_partition():
    ids = [f"P_{i}" for i in range(41)]
    sel, test = split_problems(ids, 0.5, seed=3)
    assert set(sel) | set(test) == set(ids) and not set(sel) & set(test) and len(test) == 20
    assert (sel, test) == split_problems(list(reversed(ids)), 0.5, seed=3)  # order of input does not matter
    assert test != split_problems(ids, 0.5, seed=4)[1]
    s, t = split_documents(["a", "b", "c", "d"], 0.5, 0)
    assert sorted(s + t) == [0, 1, 2, 3]


def _champ_json(path):
    problems = {f"P_C_{i}": {"identifier": f"P_C_{i}", "_text": f"Q{i}", "category": "Combinatorics" if i % 2 else "Polynomial",
                             "_answer": str(i), "solution": {"steps": [{"_text": "s1"}, {"_text": "s2"}]},
                             "conversations": {"a": {"messages": [{"role": "User", "text": "x"},
                                                                  {"role": "Model.A", "text": f"reply {i}"},
                                                                  {"role": "Model.B", "text": f"reply {i}"}]}}}
                for i in range(4)}
    path.write_text(json.dumps({"problems": problems}))
    return path


def test_load_champ_keeps_problem_of_each_reply_and_mixes(tmp_path):
    probs = load_champ(_champ_json(tmp_path / "v0.json"))
    assert [p.identifier for p in probs] == ["P_C_0", "P_C_1", "P_C_2", "P_C_3"]
    assert probs[1].replies == ["reply 1"] and probs[1].steps == ["s1", "s2"] and probs[1].answer == "1"
    counts = write_mixed_corpus(["r" * 10] * 20, ["p" * 10] * 20, tmp_path / "mix.jsonl", chars=100, share=0.3)
    assert counts["reasoning_chars"] == 30 and counts["prose_chars"] == 70
    lines = (tmp_path / "mix.jsonl").read_text().splitlines()
    assert len(lines) == counts["reasoning_docs"] + counts["prose_docs"]


def _planted_sums(rng, F=400, planted=(3, 5, 8)):
    """Units: 40 replies, 40 prose windows, 10 problems x (statement + 4 steps). Planted features fire
    3x as strongly on replies as on prose and on calculation steps as on explanation steps; the two
    problem categories are alike (no planted difference)."""
    kinds = ["reply"] * 40 + ["prose"] * 40
    for _ in range(10):
        kinds += ["statement", "step", "step", "step", "step"]
    U = len(kinds)
    n = np.full(U, 100.0)
    base = rng.uniform(0.2, 2.0, F)
    share = np.zeros(U)
    share[80:] = np.tile([0.0, 0.1, 0.4, 0.7, 0.9], 10)  # one calculation-heavy step per problem
    sums = rng.gamma(5.0, base[None] / 5.0, (U, F)) * n[:, None] / 10
    for u, k in enumerate(kinds):
        if k == "reply" or (k == "step" and share[u] > 0.66):
            sums[u, list(planted)] *= 3.0
    fired = np.minimum(sums * 5, n[:, None])
    meta = {"reply": list(range(40)), "prose": list(range(40, 80)), "reply_cluster": [i // 4 for i in range(40)],
            "prose_cluster": [i // 8 for i in range(40)], "problems": [], "steps": []}
    for i in range(10):
        s = 80 + 5 * i
        meta["problems"].append({"statement": s, "steps": [s + 1, s + 2, s + 3, s + 4], "category": ("Combinatorics", "Polynomial")[i % 2],
                                 "n_steps": 4, "share": 0.5, "tokens": 400, "statement_share": 0.5,
                                 "solution_share": 0.5, "truncated": False})
        meta["steps"] += [(s + j, i, share[s + j]) for j in range(1, 5)]
    return P.UnitSums(sums.astype(np.float32), fired.astype(np.float32), n), meta


def test_claims_find_planted_contrasts_and_not_the_absent_one():
    from saelab import statistics as S

    rng = np.random.default_rng(0)
    sums, meta = _planted_sums(rng)
    chosen = [3, 5, 8]
    freq, mass = sums.fired_UF.sum(0) / sums.n_U.sum(), sums.sum_UF.sum(0) / sums.n_U.sum()
    ctrl = S.matched_feature_sets(freq, chosen, 200, mass_F=mass, neighbours=15, seed=0)
    out = A.claims(sums, meta, np.vstack([chosen, ctrl]), n_boot=500, seed=0)
    rp = out["reasoning_vs_prose"]
    assert rp["low"] > 0 and rp["control"]["percentile"] == 100.0 and rp["control"]["n"] == 200
    assert "supported" == A.verdict(rp).split(" ")[0]
    assert out["calc_vs_expl"]["low"] > 0 and out["calc_vs_expl"]["control"]["percentile"] > 97.5
    assert out["statement_vs_solution"]["low"] > 0  # the solutions hold the calculation steps
    ml = out["math_vs_logic"]  # nothing planted: the set sits inside its controls
    assert 2.5 < ml["control"]["percentile"] < 97.5 and A.verdict(ml) != A.verdict(rp)
    assert set(out) == {"reasoning_vs_prose", "statement_vs_solution", "calc_vs_expl", "math_vs_logic",
                        "math_vs_logic_notation", "complexity"}


def test_math_vs_logic_given_notation_separates_notation_from_category():
    """Algebraic problems carry more notation. When activity follows notation only, the raw contrast is
    large but the notation-fixed one is ~0; a planted category effect beyond notation is found."""
    rng = np.random.default_rng(1)
    n = 300
    is_math = np.arange(n) % 3 != 0
    share = np.where(is_math, 0.3, 0.1) + rng.uniform(-0.08, 0.08, n)
    tokens = rng.integers(200, 900, n).astype(float)
    cov = np.column_stack([share, tokens])
    notation_only = 10 * share + rng.normal(0, 0.2, n)
    plus_category = notation_only + 0.5 * is_math
    whole = np.column_stack([notation_only, plus_category])
    assert notation_only[is_math].mean() - notation_only[~is_math].mean() > 1.5  # raw contrast: big
    rs, pc = A.category_given_notation(whole, is_math, cov)
    assert pc.low < 0 < pc.high and abs(rs[0]) < 0.15
    rs2, pc2 = A.category_given_notation(whole[:, ::-1], is_math, cov)
    assert pc2.low > 0.25 and rs2[0] > 0.35  # found: 0.5 of activity per algebraic problem, beyond notation


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning")
    return out, run(Config(hidden_cache=str(out / "hidden.safetensors")), out, dry_run=True, quiet=True)


def test_batched_ablation_rows_equal_single_runs(dry):
    """Rows of one batch carry different ablation sets: each row must equal the same set run alone,
    and the empty set must equal the clean model."""
    from saelab.models import load_model
    from saelab.saes import load_sae

    out, res = dry
    lm = load_model(res["config"]["model"], quiet=True)
    sae = load_sae(res["config"]["sae"].split(",")[0])
    probs = load_champ(res["config"]["problems_json"])
    (_, item), = P.answer_items(lm.tokenizer, probs[:1], 128)[:1]
    sets = [[], [1, 2, 3], [7], list(range(20))]
    together = P.answer_scores(lm.model, sae, "model.layers.0", item, sets, batch_size=4)
    alone = np.concatenate([P.answer_scores(lm.model, sae, "model.layers.0", item, [s], 1) for s in sets])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    ids = torch.from_numpy(item.ids)[None]
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
    clean = float(lp[torch.from_numpy(item.answer_pos - 1), ids[0, item.answer_pos]].sum())
    assert together[0, 0] == pytest.approx(clean, abs=1e-4)
    assert together[3, 0] != pytest.approx(clean, abs=1e-6)  # ablating 20 features changes something


def test_widened_ablation_equals_one_full_forward_per_set(dry):
    """answer_scores runs the layers below the hook once and widens the batch at the hook; each row
    must equal a plain full forward of the whole model with that set ablated (error term kept)."""
    from saelab.models import load_model, splice
    from saelab.saes import load_sae

    out, res = dry
    lm = load_model(res["config"]["model"], quiet=True)
    sae = load_sae(res["config"]["sae"].split(",")[0])
    hook = sae.metadata["hook"]
    (_, item), = P.answer_items(lm.tokenizer, load_champ(res["config"]["problems_json"])[:1], 128)[:1]
    sets = [[], [4, 9], list(range(0, 40, 2))]
    fast = P.answer_scores(lm.model, sae, hook, item, sets, batch_size=3)
    ids = torch.from_numpy(item.ids)[None]
    for row, s in zip(fast, sets):
        def ablate(x_BSD, s=s):
            f = sae.encode(x_BSD[0].float())
            keep = torch.zeros_like(f)
            keep[:, s] = f[:, s]
            d = sae.decode(keep) - sae.decode(torch.zeros_like(keep))
            d[0] = 0.0
            return (x_BSD[0].float() - d)[None]
        with torch.inference_mode(), splice(lm.model, hook, ablate):
            lp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        a, k = torch.from_numpy(item.answer_pos - 1), torch.from_numpy(item.key_pos - 1)
        want_answer = float(lp[a, tgt[a]].sum())
        want_key = float(lp[k, tgt[k]].mean()) if len(k) else float("nan")
        want_exact = float(bool((lp[a].argmax(-1) == tgt[a]).all()))
        np.testing.assert_allclose(row, [want_answer, want_key, want_exact], rtol=1e-4, atol=1e-4)
    assert abs(fast[2, 0] - fast[0, 0]) > 1e-4  # the 20-feature ablation changes the answer's log p


def test_dry_run_writes_report_with_controls_and_splits(dry):
    out, res = dry
    for f in ("results.json", "report.md", "claims.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    sp = saved["split"]
    assert not set(sp["select_problems"]) & set(sp["test_problems"])
    assert len(saved["saes"]) == 2
    for s in saved["saes"]:
        assert s["chosen"]
        for name in ("reasoning_vs_prose", "statement_vs_solution", "calc_vs_expl", "math_vs_logic", "math_vs_logic_notation",
                     "complexity"):
            c = s["claims"][name]
            assert c["control"]["n"] == 30 and c["verdict"]
            assert c["low"] <= c["estimate"] <= c["high"] or name == "complexity"
    assert "answer" in saved["saes"][0] and "answer" not in saved["saes"][1]
    assert "| calculation vs explanation |" in (out / "report.md").read_text()
    from saelab.circuits import read_prompts

    prompts = read_prompts(out / "circuit-prompts.jsonl")  # circuit prompts come from test problems only
    assert len(prompts) == saved["circuit_prompts"] > 0
    probs = {p.identifier: p for p in load_champ(saved["config"]["problems_json"])}
    owner = [[i for i, p in probs.items() if q.prompt.startswith(p.statement + "\n")] for q in prompts]
    assert all(o and set(o) <= set(sp["test_problems"]) for o in owner)
    for q in prompts:
        assert q.answer.isdigit() and not q.prompt[-1].isdigit()
    from safetensors.torch import load_file

    cache = load_file(str(out / "hidden.safetensors"))  # one row per token in a unit, for the one hook
    assert cache["model.layers.0"].shape == (len(cache["unit"]), 64)
    assert int(cache["unit"].max()) + 1 == sum(saved["units"].values())


def test_cli_needs_problems_json_and_sae(tmp_path, capsys):
    from saelab.cli import main

    rc = main(["experiment", "reasoning", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2 and "--sae" in capsys.readouterr().err
    rc = main(["experiment", "reasoning", "--sae", str(tmp_path), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--problems-json" in err and "Traceback" not in err


def test_short_labels_keep_what_tells_paths_apart():
    from saelab.experiments.reasoning_report import short_labels

    assert short_labels(["runs/L9_s0/sae_best", "runs/L15_s0/sae_best"]) == ["L9_s0", "L15_s0"]
    assert short_labels(["a/x/sae", "a/y/z/sae"]) == ["x", "y/z"]
    assert short_labels(["runs/L9_s0/sae_best"]) == ["sae_best"]
    assert short_labels(["s", "s"]) == ["s", "s"]


def test_report_gives_the_two_sided_p_the_verdict_uses(dry):
    out, res = dry
    text = (out / "report.md").read_text()
    assert "p vs controls (two-sided)" in text
    c = res["saes"][0]["claims"]["reasoning_vs_prose"]
    row = next(line for line in text.splitlines() if line.startswith("| reasoning features exist"))
    assert f"| {A.p_two_sided(c['control']):.3f} |" in row


def test_answer_level_continues_from_its_checkpoint(dry, tmp_path):
    """A checkpoint with the same key is read (its rows are not recomputed) and the pass goes on from
    there; one made for other sets is ignored. The dry run leaves one per answer-level SAE."""
    from safetensors.torch import load_file, save_file

    from saelab.models import load_model
    from saelab.saes import load_sae

    out, res = dry
    assert (out / "answer-0.safetensors").is_file()
    lm = load_model(res["config"]["model"], quiet=True)
    sae = load_sae(res["config"]["sae"].split(",")[0])
    hook = sae.metadata["hook"]
    items = P.answer_items(lm.tokenizer, load_champ(res["config"]["problems_json"])[:12], 128)[:3]
    sets = [[], [1, 2], [5]]
    key = P.answer_key("m", sae, hook, items, sets)
    ck = tmp_path / "answer.safetensors"
    full = P.answer_level(lm.model, sae, hook, items, sets, 3, checkpoint=ck, key=key)
    assert full.shape == (len(items), 3, 3) and len(items) >= 2
    np.testing.assert_array_equal(load_file(str(ck))["scores"].numpy(), full)
    # an interrupted run: only the first problem done, its row marked so a recomputation would show
    marked = full[:1].copy()
    marked[0, :, 0] = 123.0
    save_file({"scores": torch.from_numpy(marked), "key": load_file(str(ck))["key"]}, str(ck))
    again = P.answer_level(lm.model, sae, hook, items, sets, 3, checkpoint=ck, key=key)
    assert (again[0, :, 0] == 123.0).all()
    np.testing.assert_allclose(again[1:], full[1:], rtol=1e-5, atol=1e-5)
    other = P.answer_key("m", sae, hook, items, [[], [1, 2], [6]])
    assert other != key
    fresh = P.answer_level(lm.model, sae, hook, items, [[], [1, 2], [6]], 3, checkpoint=ck, key=other)
    assert (fresh[0, :, 0] != 123.0).all()
