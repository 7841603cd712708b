"""The wheel's metadata: torch as a range (a user's CUDA build stays), the extras, the local pins.

The metadata is built the way pip builds it (setuptools' PEP 517 hook) from a copy of pyproject.toml,
README.md and the package, so the check sees what `pip install saelab` would see.
"""
import os
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("meta")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "saelab", src / "saelab", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dist_info = out / res.stdout.strip().splitlines()[-1]
    return Parser().parsestr((dist_info / "METADATA").read_text())


def _requirements(meta, extra=None):
    out = {}
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        if (extra is None) == (not marker) and (extra is None or f'extra == "{extra}"' in marker):
            name = spec.split("<")[0].split(">")[0].split("=")[0].split("!")[0].split("~")[0].strip().lower()
            out[name] = spec.strip()
    return out


def test_torch_is_a_range_not_the_local_build(metadata):
    torch_req = _requirements(metadata)["torch"]
    assert "==" not in torch_req and ">=" in torch_req, torch_req


def test_extras_are_declared(metadata):
    assert {"dev", "interop", "wandb", "hf"} <= set(metadata.get_all("Provides-Extra"))
    assert {"pytest", "scipy"} <= set(_requirements(metadata, "dev"))
    assert {"sae-lens", "eai-sparsify"} <= set(_requirements(metadata, "interop"))
    assert "s3fs" in _requirements(metadata, "s3") and "gcsfs" in _requirements(metadata, "gcs")
    assert {"s3fs", "moto[s3]", "flask", "flask-cors"} <= set(_requirements(metadata, "dev"))  # the S3 server tests


def test_local_set_up_pins_what_it_installs():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and "transformers" in pins
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "-c constraints.txt -e '.[dev,interop]'" in makefile
    for name in ("sae-lens", "eai-sparsify", "dictionary-learning", "pytest", "scipy", "s3fs", "moto", "fsspec"):
        assert name in pins, f"{name} is installed by `make setup` but not pinned in constraints.txt"


def test_saelab_torch_threads_is_honoured_by_every_subcommand_and_checked(tmp_path):
    code = ("import sys, torch; from saelab.cli import main; "
            "rc = main(['train', '--quick-test', '--out', sys.argv[1], '--quiet']); print(torch.get_num_threads(), rc)")
    env = dict(os.environ, SAELAB_TORCH_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q")], env=env, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["1", "0"], out.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "saelab", "verify", str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, SAELAB_TORCH_THREADS="two"))
    assert bad.returncode == 2 and "SAELAB_TORCH_THREADS must be a positive integer" in bad.stderr
    assert "Traceback" not in bad.stderr
