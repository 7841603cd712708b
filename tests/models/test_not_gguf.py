"""A file named .gguf that is not GGUF is refused with a message, before the GGUF reader sees it."""
import pytest

from saelab.errors import UsageError
from saelab.models import load_model


def test_a_file_named_gguf_that_is_not_gguf(tmp_path):
    (tmp_path / "model.gguf").write_text("this is not a model")
    with pytest.raises(UsageError, match=r"is not a GGUF file \(it starts with b'this'"):
        load_model(str(tmp_path / "model.gguf"))
