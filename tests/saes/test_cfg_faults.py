"""cfg.json faults (issue 20): a truncated file is a named data error; a saved cfg.json describes its SAE."""
from __future__ import annotations

import json

import pytest
import torch

from saelab.cli import main
from saelab.errors import DataError
from saelab.saes import REGISTRY, load_sae
from tests.builders import identity_sae


@pytest.mark.parametrize("name", ["cfg.json", "metadata.json"])
def test_truncated_json_is_a_data_error_naming_the_file(tmp_path, name, capsys):
    identity_sae(4).save(tmp_path / "sae")
    p = tmp_path / "sae" / name
    p.write_text(p.read_text()[:25])
    with pytest.raises(DataError, match=rf"{p} is not valid JSON .*truncated or damaged"):
        load_sae(tmp_path / "sae")
    assert main(["export", "--format", "saelens", str(tmp_path / "sae"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


@pytest.mark.parametrize("d_sae,factor", [(1152, 2), (576 * 8, 8), (1000, 0)])
def test_saved_cfg_json_describes_the_sae_it_holds(tmp_path, d_sae, factor):
    cls, cfg_cls = REGISTRY["topk"]
    sae = cls(cfg_cls(d_in=576, d_sae=d_sae, k=4))  # expansion_factor left at its default, 8
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["expansion_factor"]) == (576, d_sae, factor)
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.expansion_factor == factor and loaded.W_dec_FD.shape == torch.Size([d_sae, 576])


@pytest.mark.parametrize("content", [b"\x80\x04\x95 a pickle", b"garbage" * 20])
def test_foreign_model_safetensors_is_named(tmp_path, content):
    from saelab.atomic import sha256_file
    from saelab.errors import UsageError

    identity_sae(4).save(tmp_path / "sae")
    w = tmp_path / "sae" / "model.safetensors"
    w.write_bytes(content)
    meta = json.loads((tmp_path / "sae" / "metadata.json").read_text())
    (tmp_path / "sae" / "metadata.json").write_text(json.dumps({**meta, "weights_sha256": sha256_file(w)}))
    with pytest.raises(UsageError, match=rf"{w} is not a readable safetensors file"):
        load_sae(tmp_path / "sae")
