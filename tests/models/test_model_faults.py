"""Model directories that must be refused with a message (issue 20): pickled weights that torch's
safe loader rejects. Never suggest weights_only=False."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.errors import UsageError
from saelab.models import load_model
from tests.builders import save_tiny_llama


class _RunsCode:
    """What a hostile pickle holds: unpickling it calls a function."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.mark.parametrize("content", ["hostile", "garbage"])
def test_pickle_weights_in_a_model_dir_are_refused_with_a_message(tmp_path, capsys, content):
    d = save_tiny_llama(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    if content == "hostile":
        torch.save({**state, "extra": _RunsCode()}, d / "pytorch_model.bin")
    else:
        (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage, not a pickle of tensors")
    with pytest.raises(UsageError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "weights_only" not in msg
    assert main(["hooks", "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "Traceback" not in err and "weights_only" not in err


def test_plain_tensor_pickle_still_loads(tmp_path):
    d = save_tiny_llama(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    assert load_model(str(d)).info["num_layers"] == 2
