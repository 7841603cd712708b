"""LoRA adapters as a hook point: read the small vector between each adapter's A and B matrices.

A peft LoRA module computes, for an adapted linear layer W (types below),

    y = W x + s * B (A x),      A: [r, d_in], B: [d_out, r], s = lora_alpha / r

and `a = A x` (rank r per token) is what saelab hooks: the output of `lora_A` (= the input of
`lora_B`). The hook spec `lora:TYPES` (TYPES a comma-separated subset of gate,up,down,q,k,v,o, any
order) reads `a` for those adapter types in every layer and concatenates them per token:

    x_BSD = concat over layer l (ascending), then type t in CANONICAL order, of a_{l,t} [B, S, r_{l,t}]
    D     = sum over present (l, t) of r_{l,t}              (= layers x types x rank for a uniform adapter)

The order is fixed, whatever order the user typed: the canonical name is `lora:` + the types in the
order gate,up,down,q,k,v,o, so `lora:q,gate` and `lora:gate,q` name the same vector. `LoraSlice`
entries map every coordinate range back to (layer, module, rank index): coordinate `start + i` is
rank index i of that adapter. They are stored in store.json as `slices[hook name]`.

Also owns the adapter checks made before peft loads an adapter (`check_adapter`: base-model shapes,
merged models) and `lora_patch`, which replaces every part's `a` by slices of a given tensor (the
two-pass way to splice an SAE reconstruction in: the parts run at different depths, so the whole
vector exists only after the pass).

Leaves out: training adapters (saelab.finetune), anything about SAEs. Shapes: B batch, S sequence,
D width of the concatenated vector, r rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from saelab.errors import UsageError
from saelab.models.points import HookPoint, causal_lm, layers_of

PREFIX = "lora:"
# adapter type -> module path inside a decoder layer (Llama family and most causal LMs)
LORA_TYPES: dict[str, str] = {
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
}
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"  # peft's adapter name when one adapter is loaded


@dataclasses.dataclass(frozen=True)
class LoraSlice:
    """Where one (layer, type) adapter sits in the concatenated vector: coordinates [start, stop)."""

    layer: int
    """Decoder layer index."""
    type: str
    """Adapter type: gate, up, down, q, k, v or o."""
    module: str
    """Module path of the adapted linear layer (`model.layers.3.mlp.gate_proj`)."""
    rank: int
    """r of this adapter (= stop - start); coordinate start + i is rank index i."""
    start: int
    """First coordinate."""
    stop: int
    """One past the last coordinate."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LoraHookPoint:
    """A composite hook point: the A->B activations of several adapters, concatenated per token."""

    name: str
    """Canonical name, `lora:gate,up,down,q,k,v,o` (types in canonical order)."""
    types: tuple[str, ...]
    """Adapter types, canonical order."""
    parts: tuple = dataclasses.field(repr=False, compare=False)
    """HookPoints of the `lora_A.default` modules, in concatenation order (one per slice)."""
    slices: tuple[LoraSlice, ...] = dataclasses.field(repr=False)
    """Coordinate map, one entry per part."""

    @property
    def width(self) -> int:
        return self.slices[-1].stop if self.slices else 0


def is_lora_spec(name: str) -> bool:
    return str(name).strip().startswith(PREFIX)


def parse_lora_spec(spec: str) -> tuple[str, ...]:
    """`lora:q,gate` -> ('gate', 'q'): the types in canonical order, checked.

    Raises:
        UsageError: an unknown or repeated type, or an empty list.
    """
    body = spec.strip()[len(PREFIX):]
    raw = [t.strip() for t in body.split(",") if t.strip()]
    bad = [t for t in raw if t not in LORA_TYPES]
    if not raw or bad:
        what = f"unknown adapter type(s) {', '.join(map(repr, bad))}" if bad else "no adapter types"
        raise UsageError(f"hook {spec!r}: {what}; expected a comma-separated subset of "
                         f"{','.join(LORA_TYPES)} (e.g. lora:gate,up,down,q,k,v,o).")
    dup = sorted({t for t in raw if raw.count(t) > 1})
    if dup:
        raise UsageError(f"hook {spec!r} names {', '.join(dup)} twice; list each adapter type once.")
    return tuple(t for t in LORA_TYPES if t in raw)


def join_lora_specs(items: Sequence[str]) -> list[str]:
    """Undo a comma split of a hook list: ['lora:gate', 'up', 'model.layers.3'] -> ['lora:gate,up', 'model.layers.3'].

    List flags split on commas, and `lora:gate,up,...` has commas of its own; a bare type name right
    after a lora: item belongs to it (a bare `up` is never a module path of its own).
    """
    out: list[str] = []
    for item in items:
        item = str(item).strip()
        if out and is_lora_spec(out[-1]) and item in LORA_TYPES:
            out[-1] = f"{out[-1]},{item}"
        else:
            out.append(item)
    return out


def canonical_name(types: Sequence[str]) -> str:
    return PREFIX + ",".join(t for t in LORA_TYPES if t in types)


def initials(types: Sequence[str]) -> str:
    """('gate', 'up', 'down', 'q', 'k', 'v', 'o') -> 'gudqkvo' (for default store names)."""
    return "".join(t[0] for t in LORA_TYPES if t in types)


def default_store_name(hook_names: Sequence[str]) -> str | None:
    """`lora_<initials>` for the first LoRA hook among `hook_names`, else None."""
    for n in hook_names:
        if is_lora_spec(n):
            return "lora_" + initials(parse_lora_spec(n))
    return None


def _lora_a_modules(lm: nn.Module) -> dict[str, nn.Module]:
    """module path of each adapted linear layer -> its `lora_A[default]` module."""
    out = {}
    for name, mod in lm.named_modules():
        if name.endswith(f".lora_A.{_ADAPTER}"):
            out[name[: -len(f".lora_A.{_ADAPTER}")]] = mod
    return out


def present_types(model: nn.Module) -> list[str]:
    """Adapter types (canonical order) for which the model holds at least one LoRA module."""
    suffixes = {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in _lora_a_modules(causal_lm(model))}
    return [t for t, path in LORA_TYPES.items() if path in suffixes]


def resolve_lora_hook(model: nn.Module, spec: str) -> LoraHookPoint:
    """The composite hook point of `spec` in `model` (a peft-wrapped causal LM).

    Raises:
        UsageError: the model holds no LoRA modules (no --adapter, or an adapter merged into the
            weights), or a requested type the adapter does not have (names the types it has).
    """
    types = parse_lora_spec(spec)
    lm = causal_lm(model)
    found = _lora_a_modules(lm)
    if not found:
        raise UsageError(
            f"hook {spec!r}: the model has no LoRA modules to hook. Pass the adapter with --adapter DIR "
            "(a peft adapter directory). An adapter merged into the weights (merge_and_unload) leaves "
            "no A->B activation to read: use the unmerged adapter directory instead.")
    have = present_types(model)
    missing = [t for t in types if t not in have]
    if missing:
        raise UsageError(f"hook {spec!r}: the adapter has no {', '.join(missing)} modules; it adapts "
                         f"{','.join(have) or 'none of ' + ','.join(LORA_TYPES)} (use e.g. lora:{','.join(have)}).")
    layers = layers_of(model)
    layer_path = {id(m): n for n, m in lm.named_modules()}.get(id(layers))
    parts, slices, start = [], [], 0
    for i in range(len(layers)):
        for t in types:
            module = f"{layer_path}.{i}.{LORA_TYPES[t]}"
            mod = found.get(module)
            if mod is None:  # adapters may skip layers (layers_to_transform)
                continue
            r = int(mod.out_features)
            name = f"{module}.lora_A.{_ADAPTER}"
            parts.append(HookPoint(name=name, module_name=name, io="output", module=mod))
            slices.append(LoraSlice(layer=i, type=t, module=module, rank=r, start=start, stop=start + r))
            start += r
    return LoraHookPoint(name=canonical_name(types), types=types, parts=tuple(parts), slices=tuple(slices))


def slices_json(hp: LoraHookPoint) -> list[dict]:
    """The store.json form of a LoRA hook's slice map."""
    return [s.to_json() for s in hp.slices]


def slices_from_json(entries: Sequence[dict]) -> list[LoraSlice]:
    return [LoraSlice(**{f.name: e[f.name] for f in dataclasses.fields(LoraSlice)}) for e in entries]


@contextlib.contextmanager
def lora_patch(model: nn.Module, hp: LoraHookPoint | str, values_BSD: torch.Tensor) -> Iterator[LoraHookPoint]:
    """Within the block, each adapter's a = A x is replaced by its slice of `values_BSD`.

    Used to splice an SAE in: capture x_BSD in a clean pass, decode x_hat_BSD, then run the model
    again under `lora_patch(model, hp, x_hat_BSD)`. Every forward in the block must have the batch
    and sequence shape of `values_BSD`.
    """
    if isinstance(hp, str):
        hp = resolve_lora_hook(model, hp)
    if values_BSD.shape[-1] != hp.width:
        raise UsageError(f"lora_patch: values have width {values_BSD.shape[-1]}, the hook {hp.name} has {hp.width}.")
    handles = []

    def make(sl: LoraSlice):
        def post(mod, args, out):
            v = values_BSD[..., sl.start:sl.stop]
            assert v.shape == out.shape, f"lora_patch values {tuple(v.shape)} vs activation {tuple(out.shape)}: other batch shape?"
            return v.to(dtype=out.dtype, device=out.device)
        return post

    try:
        for part, sl in zip(hp.parts, hp.slices):
            handles.append(part.module.register_forward_hook(make(sl)))
        yield hp
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Adapter checks before peft loads it


def _read_adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        bins = list(adapter.glob("adapter_model*.bin"))
        raise UsageError(f"adapter {adapter} has no adapter_model.safetensors"
                         + (" (only a pickle .bin, which saelab does not load)" if bins else "")
                         + ". Save the adapter with PeftModel.save_pretrained(dir) (safetensors is the default).")
    with safe_open(str(f), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def check_adapter(model: nn.Module, adapter: str | Path) -> dict:
    """Check that a peft adapter directory fits `model` before peft touches it; return its config.

    Raises:
        UsageError: not an adapter directory (a merged model directory is named as such), a pickle-only
            adapter, or modules / shapes that do not match the base model (names both shapes and the
            base model of adapter_config.json).
    """
    p = Path(adapter)
    if not (p / "adapter_config.json").is_file():
        if (p / "config.json").is_file():
            raise UsageError(f"adapter {p} is a full model directory (config.json, no adapter_config.json): "
                             "an adapter merged into the weights has no LoRA A/B matrices left to hook. Pass "
                             "it as --model instead, or pass the unmerged peft adapter directory as --adapter.")
        raise UsageError(f"adapter {p} is not a peft adapter directory (no adapter_config.json). "
                         "Pass a directory written by PeftModel.save_pretrained.")
    try:
        acfg = json.loads((p / "adapter_config.json").read_text())
    except ValueError as e:
        raise UsageError(f"adapter {p}: adapter_config.json is not valid JSON ({e}).") from None
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"adapter {p} is a {acfg.get('peft_type')} adapter; saelab hooks LoRA adapters only.")
    shapes = _read_adapter_shapes(p)
    lm = causal_lm(model)
    modules = dict(lm.named_modules())
    base = acfg.get("base_model_name_or_path") or "(not recorded)"
    mcfg = getattr(model, "config", None)
    model_name = getattr(mcfg, "_name_or_path", None) or type(lm).__name__
    problems = []
    for key, shape in sorted(shapes.items()):
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        if not m:
            continue
        path, which = m.group(1), m.group(2)
        mod = modules.get(path)
        if mod is None:
            problems.append(f"{path}: the adapter adapts it, the model has no such module")
            continue
        d_in, d_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        expect = shape[1] if which == "A" else shape[0]
        actual = d_in if which == "A" else d_out
        if actual is not None and expect != actual:
            side = "in_features" if which == "A" else "out_features"
            problems.append(f"{path}.lora_{which} has shape {list(shape)}, so it expects {side} {expect}; "
                            f"the model's {path} has {side} {actual}")
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise UsageError(
            f"adapter {p} does not fit --model: it was trained on base model {base}, the model given is "
            f"{model_name} ({type(lm).__name__}, {getattr(mcfg, 'num_hidden_layers', '?')} layers, hidden "
            f"size {getattr(mcfg, 'hidden_size', '?')}).\n  - " + "\n  - ".join(problems[:8]) + more
            + "\n  Pass the base model the adapter was trained on as --model.")
    return acfg
