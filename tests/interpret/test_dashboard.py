"""Dashboard page data and escaping (no browser; see test_browser.py for the real one)."""
import json
import re

import pytest
import torch

from saelab.interpret.dashboard import HeatmapPanel, dashboard_data, render_html, safe_json
from saelab.interpret.examples import Example
from saelab.interpret.stats import FeatureAccumulator, PassConfig, quantile_examples
from tests.builders import HOSTILE

SCRIPT_RE = re.compile(r'<script type="application/json" id="([^"]+)">(.*?)</script>', re.S)


def test_safe_json_escapes_everything_that_can_break_a_script_element():
    obj = {"t": HOSTILE + ["</SCRIPT >", "<!--", "]]>", "\u2029"], "nan": float("nan")}
    text = safe_json(obj)
    for ch in "<>&\u2028\u2029":
        assert ch not in text
    assert "\\u003c/script\\u003e" in text and "\\u003c!--" in text and "\\u0026amp;" in text
    back = json.loads(text)
    assert back["t"][: len(HOSTILE)] == HOSTILE and back["nan"] is None


def small_page():
    f = torch.zeros(6, 3)
    f[:, 0] = torch.tensor([0.5, 2.0, 0.0, 1.0, 4.0, 0.25])
    acc = FeatureAccumulator(3, PassConfig(top_k=2, reservoir=4))
    acc.update_(f, 0)
    st = acc.result()
    bands = quantile_examples(st, 2, 1)
    ex = {0: {"top": [Example(0, 4.0, 4, 9, 0, 4, [8, 9, 10], [1.0, 4.0, 0.25], 1)],
              "quant": [[Example(0, 0.25, 5, 10, 0, 5, [9, 10], [4.0, 0.25], 1)], []]},
          1: {"top": [], "quant": [[], []]}}
    texts = {8: HOSTILE[0], 9: HOSTILE[1], 10: HOSTILE[2]}
    panel = HeatmapPanel("decoder norm by layer × adapter", ["L0", "L1"], ["q", "v"], [[0.1, -0.2], [None, 0.3]])
    data = dashboard_data(st, [0, 1], ex, texts, bands=bands, panels={0: [panel]}, title="a <b>title</b> & co")
    return render_html(data), st


def test_rendered_page_embeds_data_only_as_escaped_json():
    page, st = small_page()
    blocks = dict(SCRIPT_RE.findall(page))
    assert set(blocks) == {"saelab-meta", "saelab-features", "saelab-vocab", "fd-0", "fd-1"}
    for body in blocks.values():
        assert not re.search(r"[<>&\u2028\u2029]", body)
    # hostile text appears nowhere raw in the page; the only script elements are ours
    assert "onerror=" not in page.replace("onerror=\\", "")
    assert page.count("<script") == 6 and page.count("</script>") == 6
    assert "<title>a &lt;b&gt;title&lt;/b&gt; &amp; co</title>" in page
    vocab = json.loads(blocks["saelab-vocab"])
    assert vocab["8"] == HOSTILE[0]
    feats = json.loads(blocks["saelab-features"])
    assert feats["id"] == [0, 1] and feats["count"] == [5, 0] and feats["nex"] == [2, 0]
    assert feats["max"] == [4.0, 0.0]
    d0 = json.loads(blocks["fd-0"])
    assert d0["top"] == [[4.0, 4, 1, [8, 9, 10], [1.0, 4.0, 0.25]]]
    assert d0["quant"][0]["band"] == 1 and d0["quant"][0]["examples"][0][1] == 5
    assert d0["panels"][0]["kind"] == "heatmap" and d0["panels"][0]["values"][1] == [None, 0.3]
    first, *counts = d0["hist"]
    assert sum(counts) == 5 and counts[0] > 0 and counts[-1] > 0  # trimmed to the non-empty range


def test_page_needs_no_network_and_never_uses_innerhtml():
    page, _ = small_page()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "innerHTML" not in page and "outerHTML" not in page and "insertAdjacentHTML" not in page
    assert "default-src 'none'" in page  # the CSP forbids every fetch


@pytest.mark.parametrize("n_features", [200])
def test_size_scales_linearly_and_stays_small(n_features):
    """Estimate the file size for d_sae=4608 with 10 top + 8 quantile examples of 17 tokens each."""
    f = torch.rand(400, n_features) * (torch.rand(400, n_features) < 0.2)
    acc = FeatureAccumulator(n_features, PassConfig(top_k=10, reservoir=16))
    acc.update_(f, 0)
    st = acc.result()
    ex = {j: {"top": [Example(j, 1.234567, 10**6 + i, 4000, 7, 9, list(range(40000, 40017)),
                              [0.1234567] * 17, 8) for i in range(10)],
              "quant": [[Example(j, 0.5, 10**6, 4000, 7, 9, list(range(40000, 40017)), [0.1234567] * 17, 8)] * 2] * 4}
          for j in range(n_features)}
    page = render_html(dashboard_data(st, list(range(n_features)), ex, {i: "tok" for i in range(40000, 40017)}))
    per_feature = len(page.encode()) / n_features
    assert per_feature * 4608 < 50e6, f"{per_feature:.0f} bytes per feature"
