"""How much of each chosen set's activation mass comes from massive-activation rows (docs/reasoning.md).

    python docs/runs/reasoning/massive_rows.py RUNS_DIR     (RUNS_DIR: the experiment's --hidden-cache file
    reasoning-hidden.safetensors, the SAEs L{9,15}_s{0,1,2}/sae_best and reasoning-N/results.json)

A row is massive when its norm exceeds 5x the median row norm of its layer (collect's default
--outlier-ratio). The experiment reads every unit token, massive or not; this says what that costs.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from saelab.saes import load_sae

runs = Path(sys.argv[1])
f = safe_open(str(runs / "reasoning-hidden.safetensors"), "pt")
for L in (9, 15):
    x = f.get_tensor(f"model.layers.{L}").float()
    n = x.norm(dim=1)
    med = n.median()
    big = n > 5 * med
    print(f"L{L}: rows {len(n)}, median norm {med:.1f}, rows > 5x median: {int(big.sum())} "
          f"({100 * big.float().mean():.3f}%), max ratio {float(n.max() / med):.1f}")
    for s in (0, 1, 2):
        r = json.loads((runs / f"reasoning-L{L}_s{s}" / "results.json").read_text())["saes"][0]
        chosen = [c["feature"] for c in r["chosen"]]
        sae = load_sae(runs / f"L{L}_s{s}" / "sae_best").eval()
        tot = torch.zeros(len(chosen), dtype=torch.float64)
        on_big = torch.zeros(len(chosen), dtype=torch.float64)
        with torch.inference_mode():
            for a in range(0, x.shape[0], 8192):
                fa = sae.encode(x[a:a + 8192])[:, chosen].double()
                tot += fa.sum(0)
                on_big += fa[big[a:a + 8192]].sum(0)
        share = on_big / tot.clamp(min=1e-9)
        print(f"  s{s}: chosen set's activation mass on those rows {100 * float(on_big.sum() / tot.sum()):.2f}%; "
              f"largest share of one feature {100 * float(share.max()):.1f}% (feature {chosen[int(share.argmax())]})")
