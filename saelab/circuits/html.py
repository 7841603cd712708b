"""The circuit as one self-contained HTML page (rendering only; templates/circuit.html).

The page follows the dashboard's safety rules (saelab.interpret.dashboard): no network (a
Content-Security-Policy that allows only inline script and style), data in `<script
type="application/json">` blocks written by `safe_json` (no raw <, >, &, U+2028, U+2029, so no token
can close the script element), and token text put into the DOM only through `textContent`.

    saelab-circuit   title, sites [{name, hook}], positions {labels, same_length}, nodes (the circuit),
                     edges, metric, faithfulness (without the curve), validation summary
    saelab-examples  "site:latent" -> [[value, token ids, activations, center], ...] (with --store)
    saelab-vocab     token id -> text for every token id in the examples

Clicking a node (or opening `circuit.html#node=ID`) shows its scores, its strongest edges and, when
a store was given, its top activating examples from the store (as the dashboard computes them).
"""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from saelab.circuits.circuit import Circuit
from saelab.interpret import (
    PassConfig, check_pair, feature_examples, load_or_compute_stats, safe_json, token_texts, write_html,
)
from saelab.interpret.dashboard import fill_page
from saelab.store import load_store

log = logging.getLogger(__name__)


def node_examples(circuit: Circuit, saes, store_path, top_k: int = 5, context: int = 6,
                  quiet: bool = True) -> dict[str, list]:
    """Top activating examples from a store for every latent node of the circuit.

    Returns:
        "site:latent" -> [[value, context ids, context activations, center index], ...].
    Raises:
        UsageError: an SAE whose hook is not in the store, or a width / model mismatch.
    """
    store = load_store(store_path)
    out: dict[str, list] = {}
    for j, sae in enumerate(saes):
        latents = sorted({n["index"] for n in circuit.circuit_nodes() if n["site"] == j and n["kind"] == "latent"})
        if not latents:
            continue
        hook = check_pair(sae, store, circuit.sites[j]["hook"])
        stats = load_or_compute_stats(sae, store, hook, PassConfig(top_k=max(top_k, 20)), quiet=quiet).stats
        for f, ex in feature_examples(sae, store, hook, stats, latents, top_k, None, context).items():
            out[f"{j}:{f}"] = [[round(e.value, 4), e.context_ids, [round(a, 4) for a in e.context_acts], e.center]
                               for e in ex["top"]]
    return out


def page_data(circuit: Circuit, tokenizer=None, examples: dict[str, list] | None = None, title: str = "") -> dict:
    """The JSON blocks of the page."""
    ids = sorted({i for exs in (examples or {}).values() for e in exs for i in e[1]})
    vocab = token_texts(tokenizer, ids) if (tokenizer is not None and ids) else {}
    fa = {k: v for k, v in circuit.faithfulness.items() if k != "curve"}
    val = {k: v for k, v in circuit.validation.items() if k != "nodes"}
    m = circuit.metric
    subtitle = (f"{circuit.prompts.get('n', '?')} prompts, metric {m['kind']}: model {m['full']:.3f}, "
                f"circuit {m['circuit']:.3f}, empty {m['empty']:.3f}; faithfulness {fa['circuit']:.2f}")
    data = {"title": title or "saelab circuit", "subtitle": subtitle,
            "sites": [{"name": s["name"], "hook": s["hook"]} for s in circuit.sites],
            "positions": circuit.positions, "nodes": circuit.circuit_nodes(), "edges": circuit.edges,
            "metric": {k: v for k, v in m.items() if k != "per_prompt"}, "faithfulness": fa, "validation": val}
    return {"saelab-circuit": data, "saelab-examples": examples or {}, "saelab-vocab": vocab}


def render_page(circuit: Circuit, tokenizer=None, examples: dict[str, list] | None = None, title: str = "") -> str:
    """The complete page: template + JSON blocks."""
    blocks = page_data(circuit, tokenizer, examples, title)
    parts = [f'<script type="application/json" id="{k}">{safe_json(v)}</script>' for k, v in blocks.items()]
    page = resources.files("saelab.circuits").joinpath("templates/circuit.html").read_text(encoding="utf-8")
    return fill_page(page, blocks["saelab-circuit"]["title"], parts, "circuit")


def write_page(path, circuit: Circuit, tokenizer=None, examples: dict[str, list] | None = None,
               title: str = "") -> Path:
    """Write circuit.html (tmp + rename)."""
    return write_html(Path(path), render_page(circuit, tokenizer, examples, title))
