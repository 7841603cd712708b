"""`saelab circuit` end to end on a tiny saved Llama with saved SAEs, and its bad-input messages."""
import json

import pytest

from saelab.circuits import Circuit
from saelab.circuits.prompts import tokenize, write_prompts
from saelab.cli import main
from tests.circuits import builders

pytestmark = pytest.mark.usefixtures("one_thread")
HOOKS = ["model.layers.0", "model.layers.1"]


@pytest.fixture
def saved(tmp_path):
    model, tok = builders.model_and_tokenizer(num_layers=2, double=False)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    prompts = builders.prompts(6, length=4)
    batch = tokenize(tok, prompts, "auto", 1, 0)
    dirs = []
    for s in builders.sites(model, batch, HOOKS, double=False):
        dirs.append(s.sae.save(tmp_path / s.hook, metadata={"hook": s.hook}))
    write_prompts(tmp_path / "prompts.jsonl", prompts)
    return tmp_path, dirs


def test_cli_writes_circuit_json_pngs_and_page(saved):
    tmp, dirs = saved
    out = tmp / "out"
    rc = main(["circuit", "--sae", *map(str, dirs), "--model", str(tmp / "model"), "--prompts",
               str(tmp / "prompts.jsonl"), "--out", str(out), "--max-features", "5", "--validate", "10",
               "--curve-sizes", "1,5,20", "-q"])
    assert rc == 0
    for name in ("circuit.json", "circuit.png", "faithfulness.png", "validation.png", "circuit.html", "prompts.jsonl"):
        assert (out / name).is_file(), name
    c = Circuit.load(out / "circuit.json")
    assert sum(n["kind"] == "latent" for n in c.circuit_nodes()) == 5
    assert [p["n_features"] for p in c.faithfulness["curve"]] == [1, 5, 20]
    assert c.validation["n_nodes"] == 10 and -1 <= c.validation["spearman"] <= 1
    assert c.metric["kind"] == "logit_diff" and len(c.metric["per_prompt"]) == 6
    ids = {n["id"] for n in c.nodes}
    assert all(e["source"] in ids and (e["target"] in ids or e["target"] == "metric") for e in c.edges)
    assert json.loads((out / "circuit.json").read_text())["format_version"] == 1
    assert (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_bad_input_with_a_message(saved, tmp_path, capsys):
    tmp, dirs = saved
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "the cat"}\nnot json\n{"prompt": "a", "answer": " b", "colour": 1}\n')
    rc = main(["circuit", "--sae", str(dirs[0]), "--model", str(tmp / "model"), "--prompts", str(bad), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "line 1" in err and "line 2" in err and "unknown key(s) colour" in err
    rc = main(["circuit", "--sae", str(dirs[0]), str(dirs[0]), "--model", str(tmp / "model"), "--prompts",
               str(tmp / "prompts.jsonl"), "-q"])
    assert rc == 2 and "both at hook" in capsys.readouterr().err
    rc = main(["circuit", "--sae", str(dirs[0]), "--model", str(tmp / "model"), "--prompts",
               str(tmp / "prompts.jsonl"), "--baseline", "corrupted", "-q"])
    assert rc == 2 and "corrupted" in capsys.readouterr().err
    wide = builders.relu_sae(d_in=32, d_sae=8, double=False)
    wide.save(tmp / "wide", metadata={"hook": "model.layers.0"})
    rc = main(["circuit", "--sae", str(tmp / "wide"), "--model", str(tmp / "model"), "--prompts",
               str(tmp / "prompts.jsonl"), "-q"])
    assert rc == 2 and "d_in 32" in capsys.readouterr().err
