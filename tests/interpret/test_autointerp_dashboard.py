"""Explanations and scores in the dashboard, read back from Debian's headless chromium.

Feature 0 of the planted store fires on a hostile `<img onerror=...>` token, so the rule explainer's
explanation quotes that markup: the page must show it as text (no element, no script run). The
list must be searchable by explanation words and sortable by score (the URL hash carries both).
"""
from html.parser import HTMLParser
from pathlib import Path

import pytest

from saelab.cli import main
from saelab.interpret.autointerp import AutointerpConfig, demo_autointerp, load_results, run_autointerp
from saelab.interpret.build import build_dashboard
from tests.builders import CHROMIUM, chromium

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="needs Debian's chromium at /usr/bin/chromium: run `make browser`")


class Page(HTMLParser):
    """Root attributes, <img> elements, list row ids, the explanation box text, score table rows."""

    def __init__(self):
        super().__init__()
        self.root, self.imgs, self.rows, self.explanation, self.scores = {}, [], [], None, {}
        self._in_expl, self._task, self._cell = False, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "tr" and "data-id" in a:
            self.rows.append(int(a["data-id"]))
        elif tag == "tr" and "data-task" in a:
            self._task = a["data-task"]
            self.scores[self._task] = []
        elif tag == "td" and self._task:
            self._cell = ""
        elif tag == "div" and "explanation" in (a.get("class") or "").split():
            self._in_expl, self.explanation = True, ""

    def handle_endtag(self, tag):
        if tag == "div" and self._in_expl:
            self._in_expl = False
        elif tag == "td" and self._cell is not None:
            self.scores[self._task].append(self._cell)
            self._cell = None
        elif tag == "tr":
            self._task = None

    def handle_data(self, data):
        if self._in_expl:
            self.explanation += data
        if self._cell is not None:
            self._cell += data


@pytest.fixture
def page(planted, tmp_path):
    p = planted
    sae, store, hook, res = p.sae_obj, p.store_obj, p.hook, p.res
    out = tmp_path / "ai"
    run_autointerp(sae, store, hook, res.stats, [0, 1, 2, 3, 4], AutointerpConfig(explainer="rule", scorer="rule"),
                   out, tokenizer=p.tok, quiet=True)
    recs = load_results(out)
    html = build_dashboard(sae, store, hook, res, [0, 1, 2, 3, 4, 5], tmp_path / "d.html", top_k=3, context=2,
                           tokenizer=p.tok, autointerp=recs)
    return p, recs, html, out


def test_page_data_carries_explanations_and_scores_safely(page):
    p, recs, html, _ = page
    text = html.read_text()
    assert "<img src=x" not in text.split("<!--__SAELAB_DATA__-->")[0]
    assert text.count("<img") == 0  # every '<' inside the JSON blocks is escaped
    assert '"det":[0.5,1.0,1.0,1.0,1.0,null]' in text and '"fuzz":[0.5,1.0,1.0,1.0,1.0,null]' in text


def test_dashboard_cli_reads_autointerp_results(page, tmp_path):
    p, recs, _, out = page
    dest = tmp_path / "cli.html"
    assert main(["dashboard", str(p.sae), "--data", str(p.store), "--out", str(dest), "--features", "0-2",
                 "--cache-dir", str(tmp_path / "cache"), "--autointerp", str(out), "-q"]) == 0
    assert '"expl":[' in dest.read_text() and 'the word \\"cat\\"' in dest.read_text()
    assert main(["dashboard", str(p.sae), "--data", str(p.store), "--out", str(dest),
                 "--cache-dir", str(tmp_path / "cache"), "--autointerp", str(tmp_path), "-q"]) == 2


def test_demo_step_explains_a_few_features_and_rewrites_the_dashboard(planted, tmp_path):
    p = planted
    out = demo_autointerp(p.sae_obj, p.store_obj, p.hook, p.res, [0, 1, 2, 3, 4], tmp_path / "demo", n_features=2,
                          cfg=AutointerpConfig(explainer="rule", scorer="rule"), tokenizer=p.tok, quiet=True)
    assert load_results(tmp_path / "demo" / "autointerp").keys() == {0, 2}  # spread over the list
    page = out["dashboard"].read_text()
    assert 'id="fd-4"' in page and '"expl":["the word' in page and 'the word \\"sat\\"' in page


@pytest.mark.browser
@needs_chromium
def test_hostile_explanation_is_text_and_list_is_searchable_and_sortable(page, tmp_path):
    p, recs, html, _ = page
    dom = Page()
    dom.feed(chromium(tmp_path, html.as_uri() + "#feature=0", "--dump-dom"))
    assert dom.root.get("data-errors") == "", dom.root.get("data-errors")
    assert "data-pwned" not in dom.root and dom.imgs == []
    assert "<img src=x onerror=" in recs[0]["explanation"]
    assert dom.explanation == recs[0]["explanation"]
    for task in ("detection", "fuzzing"):
        real, sh = recs[0]["scores"][task], recs[0]["shuffled"]["scores"][task]
        cells = dom.scores[task]
        assert cells[0] == task and cells[5] == str(real["n"])
        assert [float(c) for c in cells[1:5]] == pytest.approx(
            [real["balanced_accuracy"], real["auroc"], sh["balanced_accuracy"], sh["auroc"]], abs=1e-3)

    by_det = Page()
    by_det.feed(chromium(tmp_path, html.as_uri() + "#sort=det&feature=1", "--dump-dom"))
    assert by_det.rows == [1, 2, 3, 4, 0]  # 1.0 (ties by id), then 0.5; the dead feature 5 is hidden
    found = Page()
    found.feed(chromium(tmp_path, html.as_uri() + "#q=cat&feature=1", "--dump-dom"))
    assert found.rows == [1] and found.root.get("data-errors") == ""
