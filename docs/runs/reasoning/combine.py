"""Merge the six per-SAE runs of `saelab experiment reasoning` (docs/reasoning.md): one claims plot
(2 x 4 panels, one point per SAE) and the markdown tables of the docs.

    python docs/runs/reasoning/combine.py RUNS_DIR OUT_PNG    (RUNS_DIR holds reasoning-L{9,15}_s{0,1,2}/results.json;
    a reasoning200-<run>/results.json beside one replaces its answer level: the same run with 200 controls)

Cells: figure [95% cluster-bootstrap CI]; percentile among the matched controls, two-sided
permutation p = 2 min(p_greater, p_less); the verdict in short.
"""
import json
import sys
from pathlib import Path

from saelab.experiments.reasoning_analysis import p_two_sided
from saelab.experiments.reasoning_report import ANSWER, CLAIMS, plot_claims

runs_dir, png = Path(sys.argv[1]), Path(sys.argv[2])
names = [f"L{L}_s{s}" for L in (9, 15) for s in (0, 1, 2)]
runs = {n: json.loads((runs_dir / f"reasoning-{n}" / "results.json").read_text())["saes"][0]
        for n in names if (runs_dir / f"reasoning-{n}" / "results.json").is_file()}
for n in runs:  # the answer level re-run with 200 matched controls, where there is one
    more = runs_dir / f"reasoning200-{n}" / "results.json"
    if more.is_file():
        runs[n]["answer"] = json.loads(more.read_text())["saes"][0]["answer"]
keys = CLAIMS + ANSWER


def claim(s, key):
    return {**s.get("claims", {}), **s.get("answer", {})}.get(key)


plot_claims(list(runs.values()), [n.replace("_", "\n") for n in runs], png, cols=4)


def short(v):
    return "supported" if v.startswith("supported") else ("controls too" if v.startswith("effect") else "not supported")


for L in (9, 15):
    cols = [n for n in runs if n.startswith(f"L{L}_")]
    print(f"\nLayer {L}\n\n| claim | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key, title, measure in keys:
        cells = []
        for n in cols:
            c = claim(runs[n], key)
            if c is None:
                cells.append("-")
                continue
            ct = c["control"]
            p2 = p_two_sided(ct)
            f = ".2f" if abs(c["estimate"]) >= 0.1 else ".3f"
            pct = f"{ct['percentile']:.1f}".removesuffix(".0")
            cells.append(f"{c['estimate']:+{f}} [{c['low']:+{f}}, {c['high']:+{f}}]; pct {pct}, "
                         f"p {p2:.2f}; {short(c['verdict'])}")
        print(f"| {title} | " + " | ".join(cells) + " |")
print()
for n, s in runs.items():
    a = s.get("answer", {})
    print(n, "select tokens", s["select_tokens"], "enriched", s["n_reasoning_enriched"], s["n_prose_enriched"],
          "match", {k: (round(v["chosen"], 2), round(v["controls_mean"], 2)) for k, v in s.get("match", {}).items()},
          "answer", {k: a[k] for k in ("n_problems", "n_controls", "clean", "exact_ablated", "exact_controls_mean") if k in a},
          "seconds", round(s["seconds"]), "chosen", [c["feature"] for c in s["chosen"]])
