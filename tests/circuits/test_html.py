"""The circuit page in a real browser: Debian's headless chromium opens a page whose position labels,
site names and store examples are hostile token strings, selects a node from the URL hash, and we
read back the DOM it rendered.

Checks (as for the dashboard): the example tokens and values shown are the planted ones, the
hostile strings appear as text, no script error was recorded (<html data-errors>), no injected code
ran (<html data-pwned>), no <img> came from a token; and the data blocks hold no raw `<`.
"""
import re
from pathlib import Path

import numpy as np
import pytest

from saelab.circuits.circuit import Circuit
from saelab.circuits.html import node_examples, render_page, write_page
from tests.builders import CHROMIUM, HOSTILE, PageDom, chromium, hostile_tokenizer, relu_identity_sae, write_store
from tests.builders import HOSTILE_VOCAB as VOCAB


def _circuit() -> Circuit:
    node = {"id": "0:2:1", "site": 0, "position": 2, "index": 1, "kind": "latent", "score": -0.5, "activation": 1.0,
            "delta": -1.0, "rank": 0, "in_circuit": True}
    err = {"id": "0:1:err", "site": 0, "position": 1, "index": None, "kind": "error", "score": 0.25,
           "activation": 0.3, "delta": 0.2, "rank": 1, "in_circuit": True}
    return Circuit(
        sites=[{"name": HOSTILE[0], "hook": "model.layers.0", "d_sae": 4, "d_in": 4, "architecture": "relu", "path": None}],
        nodes=[node, err], edges=[{"source": "0:1:err", "target": "0:2:1", "weight": 0.1},
                                  {"source": "0:2:1", "target": "metric", "weight": -0.5}],
        metric={"kind": "logit_diff", "full": 2.0, "empty": 0.0, "circuit": 1.5, "complement": 0.5, "per_prompt": [2.0]},
        faithfulness={"circuit": 0.75, "complement": 0.25, "curve": []}, validation={"n_nodes": 0},
        positions={"labels": ["<bos>", *HOSTILE], "same_length": True, "lengths": [7]},
        prompts={"n": 1, "examples": []}, config={})


@pytest.fixture
def store_and_sae(tmp_path):
    """3 sequences of 9 tokens; latent 1 of the identity SAE fires only on hostile tokens (distinct values)."""
    rng = np.random.default_rng(0)
    seqs, acts = [], []
    for i in range(3):
        ids = rng.integers(1, len(VOCAB), size=9)
        x = np.zeros((9, 4), np.float32)
        x[:, 0] = 1 + i
        x[:, 1] = np.where(ids >= 8, 1 + (9 * i + np.arange(9)) / 64, -1.0)
        x[:, 2:] = -1.0
        seqs.append(ids.tolist())
        acts.append(x)
    tok_dir = tmp_path / "tok"
    tok = hostile_tokenizer(tok_dir)
    store = write_store(tmp_path / "store", seqs, acts, tok_dir, num_shards=1, seqs_per_chunk=3)
    from saelab.saes import load_sae

    return store, load_sae(relu_identity_sae(tmp_path / "sae", 4)), tok, seqs, acts


def test_page_data_is_escaped(store_and_sae):
    store, sae, tok, seqs, acts = store_and_sae
    examples = node_examples(_circuit(), [sae], store, top_k=3, context=2)
    page = render_page(_circuit(), tok, examples, title=HOSTILE[1])
    for block in re.findall(r'<script type="application/json" id="[^"]+">(.*?)</script>', page, re.S):
        assert "<" not in block and ">" not in block and "\u2028" not in block
    assert "<img src=x" not in page and "&lt;img src=x" in page  # the title is HTML-escaped


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium: run "
                    "`make browser` (apt-get install chromium)")
def test_circuit_page_in_headless_chromium(store_and_sae, tmp_path):
    store, sae, tok, seqs, acts = store_and_sae
    circuit = _circuit()
    examples = node_examples(circuit, [sae], store, top_k=3, context=2)
    page = write_page(tmp_path / "circuit.html", circuit, tok, examples, title=HOSTILE[0])
    dom = PageDom()
    dom.feed(chromium(tmp_path, page.as_uri() + "#node=0:2:1", "--dump-dom"))

    assert dom.root.get("data-errors") == "", dom.root.get("data-errors")
    assert "data-pwned" not in dom.root, f"injected code ran: {dom.root['data-pwned']}"
    assert dom.imgs == []
    assert dom.body.get("data-rendered") == "0:2:1"
    shown = lambda t: t.replace("\n", "\u21b5")
    assert dom.labels == [shown(HOSTILE[0]), shown(HOSTILE[1])]  # positions 1 and 2: hostile tokens, as text

    # planted: latent 1 = x[:, 1] where the token is hostile; the top 3 over the store, in order
    planted = sorted(((float(a[t, 1]), s, t) for s, a in enumerate(acts) for t in range(9) if a[t, 1] > 0), reverse=True)[:3]
    assert len(dom.examples) == 3
    for ex, (value, s, t) in zip(dom.examples, planted):
        assert float(ex["value"]) == pytest.approx(value, rel=1e-3)
        assert ex["tokens"][ex["center"]] == shown(VOCAB[seqs[s][t]]) and VOCAB[seqs[s][t]] in HOSTILE
        assert ex["tokens"] == [shown(VOCAB[i]) for i in seqs[s][max(0, t - 2):t + 3]]

    png = tmp_path / "circuit.png"
    chromium(tmp_path, page.as_uri() + "#node=0:2:1", f"--screenshot={png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
