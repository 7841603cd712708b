"""The markdown rows of docs/rkcnn.md's factorial tables from an rkcnn-arms results.json.

    python docs/runs/rkcnn/table.py RESULTS_JSON step0|topk50|faithful
"""
import json, sys
r = json.load(open(sys.argv[1])); s = r['summary']; mode = sys.argv[2]
def ms(d, f=3, scale=1):
    return f"{d['mean']*scale:.{f}f} ± {d['std']*scale:.{f}f}"
def df(d, f=3, scale=1):
    x = d['diff']
    if x is None: return ""
    return f" ({x['estimate']*scale:.{f}f} [{x['low']*scale:.{f}f}, {x['high']*scale:.{f}f}])"
for arm, a in s.items():
    base = arm.startswith('baseline')
    mined = int(a['n_mined']['mean'])
    if mode == 'step0':
        cells = [arm, str(mined), ms(a['fvu_step0']) + ("" if base else df(a['fvu_step0'])),
                 ms(a['dead_frac'], 1, 100) + ("" if base else df(a['dead_frac'], 1, 100)),
                 "n/a" if base else f"{a['mined_dead_frac']['mean']*100:.0f} ± {a['mined_dead_frac']['std']*100:.0f}",
                 "n/a" if base else ms(a['redundancy_step0'], 2)]
    elif mode == 'faithful':
        cells = [arm, str(mined), f"{a['dead_count']['mean']:.1f} ± {a['dead_count']['std']:.1f}" if 'dead_count' in a else "",
                 ms(a['dead_frac'], 2, 100) + ("" if base else df(a['dead_frac'], 2, 100)),
                 ms(a['l0_store'], 1) + ("" if base else df(a['l0_store'], 1)),
                 ms(a['fvu'], 5) + ("" if base else df(a['fvu'], 5)),
                 ms(a['ev_seed'], 5) + ("" if base else df(a['ev_seed'], 5)),
                 ms(a['fvu_step0'], 2) + ("" if base else df(a['fvu_step0'], 2)),
                 "n/a" if base else f"{a['mined_dead_frac']['mean']*100:.2f} ± {a['mined_dead_frac']['std']*100:.2f}",
                 ms(a['other_dead_frac'], 2, 100) + ("" if base else df(a['other_dead_frac'], 2, 100)),
                 f"{a['seconds']['mean']/60:.1f}"]
    else:
        cells = [arm, str(mined), ms(a['fvu_step0']) + ("" if base else df(a['fvu_step0'])),
                 ms(a['fvu'], 4) + ("" if base else df(a['fvu'], 4)),
                 ms(a['dead_frac'], 2, 100) + ("" if base else df(a['dead_frac'], 2, 100)),
                 ms(a['ev_seed'], 3) + ("" if base else df(a['ev_seed'], 3)),
                 "n/a" if base else f"{a['mined_dead_frac']['mean']*100:.1f} ± {a['mined_dead_frac']['std']*100:.1f}",
                 ms(a['other_dead_frac'], 1, 100) + ("" if base else df(a['other_dead_frac'], 1, 100))]
    print("| " + " | ".join(cells) + " |")
n = len(r['per_run']); print(f"\n{n} runs, {r['seconds']:.0f} s in all, {r['seconds']/n:.0f} s each on average")
