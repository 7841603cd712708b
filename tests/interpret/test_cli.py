"""`saelab interpret stats|feature` and `saelab dashboard` end to end on the crafted store, aliases included."""
import csv
import json

import numpy as np
import pytest

from saelab.cli import main
from saelab.cli.interpret import parse_feature_list
from saelab.errors import UsageError


def test_stats_prints_tables_and_writes_csv_json(crafted, tmp_path, capsys):
    c = crafted
    rc = main(["interpret", "stats", str(c.sae), "--data", str(c.store), "--out", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path / "cache"), "--rows", "2", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 features on 45 tokens" in out and "dead (never fired): 1 (25.0%)" in out
    by_max = out.split("by max activation:")[1].split("\n")[2:4]
    assert [int(line.split()[0]) for line in by_max] == [0, 3]  # feature 0 peaks at 5.8
    rows = list(csv.DictReader(open(tmp_path / "o" / "feature_stats.csv")))
    assert [int(r["count"]) for r in rows] == (c.f > 0).sum(0).tolist()
    assert float(rows[0]["max"]) == pytest.approx(c.f[:, 0].max(), rel=1e-6)
    js = json.loads((tmp_path / "o" / "feature_stats.json").read_text())
    assert js["dead"] == 1 and js["num_tokens"] == 45 and len(js["features"]) == 4


def test_kimi_aliases_statistics_and_first_shard(crafted, tmp_path, capsys):
    c = crafted
    rc = main(["interpret", "--sae_path", str(c.sae), "--data_dir", str(c.store), "--num_shards", "1",
               "--statistics", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert rc == 0 and "4 features on 27 tokens" in capsys.readouterr().out  # shard 0: sequences 0, 2, 4


def test_feature_shows_top_tokens_with_marked_context(crafted, tmp_path, capsys):
    c = crafted
    rc = main(["interpret", "--sae_path", str(c.sae), "--data_dir", str(c.store), "--feature_id", "0",
               "--top_k", "3", "--context", "2", "--cache-dir", str(tmp_path / "cache"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.split("top 3 activations:")[1].strip().split("\n")[1:4]
    g = int(np.argmax(c.f[:, 0]))  # row 26: sequence 4, position 8
    rank, act, index, tok_id = lines[0].split()[:4]
    assert (int(rank), int(index), int(tok_id)) == (1, g, c.tokens[g])
    assert float(act) == pytest.approx(c.f[g, 0], rel=1e-3)
    from tests.builders import HOSTILE_VOCAB
    ctx = "".join(HOSTILE_VOCAB[t] for t in c.seqs[4][6:8]) + "[[" + HOSTILE_VOCAB[c.seqs[4][8]] + "]]"
    assert lines[0].endswith(ctx.replace("\n", "\\n"))


def test_bad_input_exits_2_with_a_message(crafted, tmp_path, capsys):
    c = crafted
    assert main(["interpret", "feature", str(c.sae), "--data", str(c.store), "--feature", "4"]) == 2
    assert "feature id 4 out of range: this SAE has d_sae=4" in capsys.readouterr().err
    assert main(["interpret", "feature", str(c.sae)]) == 2
    assert "no store: pass --data" in capsys.readouterr().err
    assert main(["dashboard", "--data", str(c.store)]) == 2
    assert "no SAE directory" in capsys.readouterr().err


def test_dashboard_command_and_feature_lists(crafted, tmp_path):
    c = crafted
    out = tmp_path / "d.html"
    assert main(["dashboard", "--sae", str(c.sae), "--data", str(c.store), "--out", str(out),
                 "--features", "0,2-3", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    page = out.read_text()
    assert 'id="fd-0"' in page and 'id="fd-3"' in page and 'id="fd-1"' not in page
    assert parse_feature_list("2", 10) == [0, 1] and parse_feature_list(None, 3) == [0, 1, 2]
    assert parse_feature_list("7,1-3", 10) == [1, 2, 3, 7]
    with pytest.raises(UsageError, match="out of range"):
        parse_feature_list("3,12", 10)
