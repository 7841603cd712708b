"""The dashboard in a real browser: Debian's headless chromium loads a page built from a store whose
tokens are hostile strings, opens a feature from the URL hash, and we read back the DOM it rendered.

Checks: the example tokens and values shown are the planted ones, no script error was recorded
(the page writes window errors into <html data-errors>), no injected code ran (a hostile token
that executed would set <html data-pwned>; an <img> from a token would appear in the DOM), and a
screenshot PNG is saved (tmp_path/dashboard.png; SAELAB_SCREENSHOT=path keeps a copy).
"""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from saelab.cli import main
from tests.builders import CHROMIUM, HOSTILE, HOSTILE_VOCAB, PageDom, chromium

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium: run `make browser` "
                              "(apt-get install chromium)"),
]


def test_dashboard_in_headless_chromium(crafted, tmp_path):
    c = crafted
    page = tmp_path / "dashboard.html"
    rc = main(["dashboard", str(c.sae), "--data", str(c.store), "--out", str(page), "--top-k", "5",
               "--context", "3", "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert rc == 0 and page.is_file()
    url = page.as_uri() + "#feature=1"
    dom = PageDom()
    dom.feed(chromium(tmp_path, url, "--dump-dom"))

    assert dom.root.get("data-errors") == "", dom.root.get("data-errors")
    assert "data-pwned" not in dom.root, f"injected code ran: {dom.root['data-pwned']}"
    assert dom.imgs == [], "a token became an <img> element"
    assert dom.body.get("data-rendered") == "1"

    # feature 1 fires only on hostile tokens (ids >= 8): the planted top 5, in order
    f1 = c.f[:, 1]
    top = np.argsort(-f1, kind="stable")[:5]
    shown = [e for e in dom.examples if e["section"] == "top-examples"]
    assert [e["index"] for e in shown] == top.tolist()
    shown_text = lambda t: t.replace("\n", "\u21b5")  # the page shows newlines as ↵
    for e, g in zip(shown, top):
        assert float(e["value"]) == pytest.approx(f1[g], rel=1e-3)
        center_token = e["tokens"][e["center"]]
        assert center_token == shown_text(HOSTILE_VOCAB[c.tokens[g]])
        assert center_token in HOSTILE  # the hostile string shows as text
        assert e["acts"][e["center"]] == pytest.approx(f1[g], rel=1e-3)
        seq, pos = c.seqpos[g]
        lo = max(0, pos - 3)
        assert e["tokens"] == [shown_text(HOSTILE_VOCAB[t]) for t in c.seqs[seq][lo:pos + 4]]
    assert any(e["section"] == "quantile-examples" for e in dom.examples)

    png = tmp_path / "dashboard.png"
    chromium(tmp_path, url, f"--screenshot={png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    if os.environ.get("SAELAB_SCREENSHOT"):
        shutil.copy(png, os.environ["SAELAB_SCREENSHOT"])
