"""Where saelab keeps what it downloads or caches: one data directory, `SAELAB_HOME`.

Default `~/.cache/saelab`. Layout:
    corpora/<name>/     built-in corpora fetched from the package registries
    models/<sha256>/    dequantised copies of GGUF models (fast reload)
"""
from __future__ import annotations

import os
from pathlib import Path


def saelab_home() -> Path:
    """The data directory: `$SAELAB_HOME`, else `~/.cache/saelab`."""
    env = os.environ.get("SAELAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saelab"
