"""`saelab experiment circuits --dry-run`: a tiny random Llama, a collected store, trained SAEs, a
circuit per built-in task, the control and the report, end to end in seconds."""
import json

import pytest

from saelab.circuits import Circuit
from saelab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_writes_every_task(tmp_path, capsys):
    assert main(["experiment", "circuits", "--dry-run", "--out", str(tmp_path), "-q"]) == 0
    assert "| agreement |" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["tasks"]) == ["agreement", "arithmetic", "champ"]
    for name, r in res["tasks"].items():
        for f in ("circuit.json", "circuit.png", "faithfulness.png", "validation.png", "circuit.html"):
            assert (tmp_path / name / f).is_file()
        c = Circuit.load(tmp_path / name / "circuit.json")
        assert r["n_features"] == sum(n["kind"] == "latent" for n in c.circuit_nodes()) == 10
        assert len(r["control_faithfulness"]) == 2
    assert Circuit.load(tmp_path / "champ" / "circuit.json").config["aggregate"] == "positions"
    assert (tmp_path / "report.md").read_text().count("\n| ") == 3  # one row per task
