"""Data fidelity on the embedded model: does a store of plain text look like what users' text gives?

Not a speed benchmark: it checks the store and an SAE against the targets of docs/data-fidelity.md,
on a plain-English corpus that is not one of the built-ins (Python's own documentation topics,
shipped with every Python as `pydoc_data.topics`), with saelab's defaults:

    collect   --layer 15 --tokens 100k (defaults otherwise)       -> flagged share       < 0.1%
                                                                     top 0.5% of used rows hold < 20% of the variance
    train     TopK, k 32, x4, 60k training tokens                  -> per-token relative error <= 0.35
    evaluate  downstream on held-out English text                  -> CE loss recovered >= 0.5

The downstream text is Debian's license texts (/usr/share/common-licenses) when present, else the
second half of the documentation topics. Prints every figure next to its target; exit 0 either way.

    .venv/bin/python benchmarks/bench_fidelity.py --workdir runs/fidelity
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def sh(*args: str) -> str:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "saelab", *args], check=True, capture_output=True, text=True)
    print(f"$ saelab {' '.join(args)}   ({time.time() - t0:.0f} s)", flush=True)
    return out.stdout


def corpora(work: Path) -> tuple[Path, Path]:
    import pydoc_data.topics as topics

    docs, held = work / "pydoc-topics", work / "heldout"
    if not docs.is_dir():
        docs.mkdir(parents=True)
        names = sorted(topics.topics)
        for i, k in enumerate(names):
            (docs / f"{i:03d}_{k.replace('/', '_')}.txt").write_text(topics.topics[k])
    if not held.is_dir():
        held.mkdir(parents=True)
        lic = Path("/usr/share/common-licenses")
        src = sorted(p for p in lic.iterdir() if p.is_file()) if lic.is_dir() else []
        for p in src:
            (held / f"{p.name}.txt").write_text(p.read_text(errors="replace"))
        if not src:
            for p in sorted(docs.iterdir())[1::2]:
                (held / p.name).write_text(p.read_text())
    return docs, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/fidelity")
    ap.add_argument("--store", default=None, help="reuse this store instead of collecting one")
    ap.add_argument("--train-tokens", default="60k")
    args = ap.parse_args()
    work = Path(args.workdir)
    docs, held = corpora(work)
    store = Path(args.store) if args.store else work / "store"
    if not args.store:
        sh("collect", "--corpus", str(docs), "--layer", "15", "--tokens", "100k", "--out", str(store), "--quiet")
    print(sh("verify", str(store)))

    from saelab.evaluate.reconstruction import mean_of_rows, store_batches
    from saelab.metrics import variance_share_of_top
    from saelab.store import load_store

    st = load_store(store)
    hook = st.hooks[0]
    rows = st.num_tokens
    flagged = st.flagged_count(hook)
    mean_D = mean_of_rows(store_batches(st, hook, "all", 4096))
    dev = [((b.x_BD[~b.flagged_B].double() - mean_D) ** 2).sum(-1) for b in store_batches(st, hook, "all", 4096)]
    share = variance_share_of_top(torch.cat(dev), 0.005)
    run = work / "topk_k32_x4"
    if run.exists():  # this script's own output from an earlier run
        shutil.rmtree(run)
    sh("train", "--data", str(store), "--out", str(run), "--architecture", "topk", "--k", "32",
       "--expansion-factor", "4", "--tokens", args.train_tokens, "--quiet")
    print(sh("evaluate", str(run / "sae_best"), "--data", str(store), "--model", "default", "--corpus", str(held),
             "--out", str(work / "eval"), "--quiet"))
    r = json.loads((work / "eval" / "eval.json").read_text())["results"][0]
    print(f"store: {rows:,} rows of {hook}")
    print(f"flagged as massive activations: {flagged:,} ({100 * flagged / rows:.4f}%)        target < 0.1%")
    print(f"top 0.5% of the rows train/evaluate use hold {100 * share:.2f}% of their variance   target < 20%")
    print(f"per-token relative error (val split): {r['rel_error']:.3f}               target <= 0.35")
    print(f"CE loss recovered ({r['downstream_tokens']:,} held-out predictions): {r['ce_recovered']:.3f}"
          f"      target >= 0.5")
    print(f"also: FVU {r['fvu']:.4f} (with flagged rows {r['fvu_with_outliers']:.4f}), L0 {r['l0']:.1f}, "
          f"KL {r['kl']:.4f}, CE clean/SAE/zero {r['ce_clean']:.3f}/{r['ce_sae']:.3f}/{r['ce_zero']:.3f}, "
          f"positions left unedited {r['downstream_left']}")


if __name__ == "__main__":
    main()
