"""saelab: sparse autoencoders for language-model activations."""
__version__ = "0.1.0"

# Public names, imported on first use so that `import saelab` stays cheap (no torch, no numpy).
_LAZY = {"load_store": "saelab.store", "load_sae": "saelab.saes"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
