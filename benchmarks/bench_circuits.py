"""Benchmark: one attribution pass over every node against a forward + backward pass of the model.

All timed in this process, interleaved, on the embedded model (SmolLM2-135M) and the same prompts
(the built-in agreement task), with random TopK SAEs (d_sae 4608, k 32) on the residual stream at
--layers (the cost of a pass does not depend on what the SAEs learned):

    reference   forward + backward of the metric with the parameters frozen, gradient reaching the
                embedding output (the least work that yields d m / d x at every layer)
    ref+params  the same with parameter gradients (a training step's forward + backward)
    atp         circuits.attribute(method="atp") + rank_nodes: the clean forward + backward, the SAE
                encodes, the mean baseline and every node's score (no edges)
    ig          the same with --ig-steps integrated-gradient points per SAE
    edges       compute_edges for the top --edge-nodes nodes (one backward pass each), reported apart

Printed: atp / reference (target <= 3), ig / reference, and edge seconds per downstream node.

    .venv/bin/python benchmarks/bench_circuits.py [--prompts 32] [--repeats 3] [--layers 3,7,11,15]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saelab.circuits import Site, attribute, compute_edges, rank_nodes, tokenize  # noqa: E402
from saelab.circuits.attribution import frozen  # noqa: E402
from saelab.circuits.prompts import metric_forward, metric_from_logits  # noqa: E402
from saelab.circuits.tasks import build_task  # noqa: E402
from saelab.models import load_model, tokenizer_info  # noqa: E402
from saelab.saes import TopKConfig, make_sae  # noqa: E402


def reference(model, batch, params: bool) -> None:
    emb = model.get_input_embeddings()
    with torch.enable_grad():
        if params:
            m = metric_forward(model, batch)
            m.sum().backward()
            model.zero_grad(set_to_none=True)
            return
        with frozen(model):
            x = emb(batch.input_ids_BS).detach().requires_grad_()
            out = model(inputs_embeds=x, attention_mask=batch.attention_mask_BS, use_cache=False,
                        logits_to_keep=batch.read_pos_BP)
            torch.autograd.grad(metric_from_logits(out.logits, batch).sum(), [x])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", default="3,7,11,15")
    ap.add_argument("--ig-steps", type=int, default=10)
    ap.add_argument("--edge-nodes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default", quiet=True)
    model = lm.model
    prompts = build_task("agreement", args.prompts, 0, lm.tokenizer)
    ti = tokenizer_info(lm.tokenizer)
    batch = tokenize(lm.tokenizer, prompts, "auto", ti["bos_id"], ti["pad_id"])
    torch.manual_seed(0)
    sites = [Site(f"L{i}", f"model.layers.{i}", make_sae(TopKConfig(d_in=576, d_sae=4608, k=32)).eval())
             for i in map(int, args.layers.split(","))]
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{args.threads} threads; {len(prompts)} prompts x {batch.input_ids_BS.shape[1]} tokens; "
          f"SAEs at layers {args.layers} (TopK 4608, k 32)")
    runs = {
        "reference": lambda: reference(model, batch, params=False),
        "ref+params": lambda: reference(model, batch, params=True),
        "atp": lambda: rank_nodes(attribute(model, sites, batch, "atp"), sites, "none"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    reference(model, batch, params=False)  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    t = time.perf_counter()
    attribute(model, sites, batch, "ig", ig_steps=args.ig_steps)
    t_ig = time.perf_counter() - t
    attr = attribute(model, sites, batch, "atp")
    ranked, _ = rank_nodes(attr, sites, "none")
    top = ranked[:args.edge_nodes]
    t = time.perf_counter()
    edges = compute_edges(model, sites, batch, attr, top)
    t_edges = time.perf_counter() - t
    n_down = sum(1 for n in top if n.site != attr.order[0])
    for k in runs:
        print(f"  {k:<11} median {med[k]:7.3f} s  (runs: {', '.join(f'{x:.3f}' for x in times[k])})")
    print(f"  ig ({args.ig_steps} steps x {len(sites)} SAEs)  {t_ig:7.3f} s (one run)")
    print(f"  edges among the top {len(top)} nodes ({n_down} downstream, {len(edges)} pairs)  {t_edges:7.3f} s, "
          f"{t_edges / max(n_down, 1):.3f} s per downstream node")
    print(f"atp / reference forward+backward   {med['atp'] / med['reference']:.2f}x  (target <= 3)")
    print(f"atp / forward+backward with params {med['atp'] / med['ref+params']:.2f}x")
    print(f"ig / reference                     {t_ig / med['reference']:.2f}x")


if __name__ == "__main__":
    main()
