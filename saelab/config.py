"""Config machinery: dataclass <-> command-line flags, YAML files and JSON.

Each config is a dataclass that lives beside the code that reads it (`TrainConfig` in `train.py`,
`TopKConfig` in `saes/topk.py`). This module owns only the plumbing, so that every fact lives once:

    field name  = YAML key  = --flag (spelled with `_` or `-`)
    field default            = the default everywhere
    attribute docstring      = the --help text (read with simple-parsing's docstring reader)

Precedence: dataclass defaults < `--config file.yaml` < flags given on the command line.
An unknown YAML key or JSON key is an error that names it and suggests the nearest field.

Groups: a field declared with `group(ModelConfig, model=None, exclude=("adapter",))` embeds a
shared config (ModelConfig, CorpusConfig, ...) and is flattened: its fields become flags, YAML and
JSON keys of the outer config under their own names (`--model`, `--max-length`), with this
stage's defaults, minus the excluded ones. `to_dict` writes the flat form, `config_from_dict`
reads it back, so a field lives in one dataclass and keeps its spelling everywhere.

Types understood on the command line: int (accepts `10M`, `1.5k`, `2_000`, `1e6`), float, str, bool
(`--flag` / `--no-flag`), `Literal[...]` (closed choices), `X | None`, and `list[int|float|str]`
(comma-separated: `--k 16,32,64`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from saelab.errors import UsageError, did_you_mean

T = TypeVar("T")

_SUFFIXES = {"k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9, "G": 10**9}


def parse_int(text: str | int) -> int:
    """Parse an integer that may carry a k/M/B suffix or be written as 1e6: '10M' -> 10_000_000."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().replace("_", "")
    mult = 1
    if s and s[-1] in _SUFFIXES:
        mult, s = _SUFFIXES[s[-1]], s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"not a whole number: {text!r} (examples: 4096, 10M, 1.5k)") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"not a whole number: {text!r} (examples: 4096, 10M, 1.5k)")
    return int(value)


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    """A function str -> value for a field type, raising ValueError on bad text."""
    base, optional = _unwrap_optional(tp)

    def convert(text):
        if optional and (text is None or str(text).strip().lower() in ("none", "null", "")):
            return None
        return _convert_base(base, text)

    return convert


def _convert_base(base: Any, text: Any) -> Any:
    origin = get_origin(base)
    if origin is Literal:
        choices = get_args(base)
        for c in choices:
            if str(c) == str(text):
                return c
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (item,) = get_args(base)[:1] or (str,)
        if isinstance(text, (list, tuple)):
            parts = list(text)
        else:
            parts = [p for p in str(text).split(",") if p.strip() != ""]
        return [_convert_base(item, p) for p in parts]
    if base is bool:
        return _parse_bool(text)
    if base is int:
        return parse_int(text)
    if base is float:
        if isinstance(text, bool):
            raise ValueError(f"not a number: {text!r}")
        return float(text)
    if base is str:
        return str(text)
    if base is Path:
        return Path(text)
    return text


def _resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def group(cls: type, exclude: tuple[str, ...] = (), **defaults: Any) -> Any:
    """A dataclass field that embeds config `cls`, flattened into the outer config (module docstring).

    Args:
        cls: the shared config dataclass.
        exclude: its fields that get no flag or key here (they keep `defaults` or cls's defaults).
        defaults: this stage's defaults for some of its fields.
    """
    unknown = set(defaults) | set(exclude)
    unknown -= {f.name for f in dataclasses.fields(cls)}
    assert not unknown, f"group({cls.__name__}): no such field(s) {sorted(unknown)}"
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"group": cls, "exclude": tuple(exclude)})


def grouped(cls: type[T]) -> type[T]:
    """Class decorator for a config with `group(...)` fields: its constructor (and so
    `dataclasses.replace`) also takes a group's fields by their flat names,

        CollectConfig(model="x.gguf", max_length=512)  ==  CollectConfig(lm=ModelConfig(model="x.gguf"),
                                                                          text=CorpusConfig(..., max_length=512))

    applied over the group value given or this stage's defaults."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        fields = flat_fields(cls)
        by_group: dict[str, dict[str, Any]] = {}
        for name in [n for n in kwargs if n in fields and fields[n].path]:
            by_group.setdefault(fields[name].path[0], {})[name] = kwargs.pop(name)
        for gname, values in by_group.items():
            base = kwargs.get(gname)
            if base is None:
                base = _default_of(next(f for f in dataclasses.fields(cls) if f.name == gname))
            kwargs[gname] = dataclasses.replace(base, **values)
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


def _is_group(f: dataclasses.Field) -> bool:
    return "group" in f.metadata


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One flag / key of a config: where it lives (`path` of group names) and its field."""

    name: str
    owner: type
    """The dataclass that declares it (for its help text)."""
    field: dataclasses.Field
    type: Any
    path: tuple[str, ...]
    """(group field name,) for a field of an embedded group, () for a field of the outer config."""
    default: Any


def flat_fields(cls: type, _path: tuple[str, ...] = (), _defaults: Any = None) -> dict[str, FlatField]:
    """Every flag of `cls`, groups flattened, in declaration order; a name declared twice is a bug."""
    out: dict[str, FlatField] = {}
    for f, tp in _resolved_fields(cls):
        default = getattr(_defaults, f.name) if _defaults is not None else _default_of(f)
        if _is_group(f):
            assert not _path, f"{cls.__name__}.{f.name}: groups are one level deep"
            inner = flat_fields(f.metadata["group"], _path + (f.name,), default)
            for name, ff in inner.items():
                if name not in f.metadata["exclude"]:
                    assert name not in out, f"{cls.__name__}: flag --{name} is declared twice"
                    out[name] = ff
            continue
        assert f.name not in out, f"{cls.__name__}: flag --{f.name} is declared twice"
        out[f.name] = FlatField(f.name, cls, f, tp, _path, default)
    return out


def field_help(cls: type, name: str) -> str:
    """The attribute docstring under a dataclass field (its --help text), searched up the MRO."""
    from simple_parsing.docstring import get_attribute_docstring

    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass) or name not in getattr(klass, "__annotations__", {}):
            continue
        doc = get_attribute_docstring(klass, name)
        text = (doc.docstring_below or doc.comment_inline or doc.comment_above or "").strip()
        if text:
            return " ".join(text.split())
    return ""


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    exclude: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """Add one flag per field of `cls` (groups flattened). Parsed values land under the field's name;
    a flag not given stays absent (argparse.SUPPRESS), so `build_config` can tell it apart from a
    default."""
    group_ = parser.add_argument_group(title or cls.__name__) if title is not False else parser
    for name, ff in flat_fields(cls).items():
        if name in exclude:
            continue
        names = [f"--{name}"]
        if "_" in name:
            names.append(f"--{name.replace('_', '-')}")
        default = ff.default
        help_text = field_help(ff.owner, name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"
        base, _ = _unwrap_optional(ff.type)
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if base is bool:
            group_.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(base) is Literal:
            kwargs["metavar"] = "{" + ",".join(map(str, get_args(base))) + "}"
        conv = _converter(ff.type)

        def typed(text, _conv=conv, _name=name):
            try:
                return _conv(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        typed.__name__ = name  # argparse names the flag's type in its error message
        group_.add_argument(*names, type=typed, **kwargs)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build `cls` from a flat dict (YAML/JSON; groups flattened), converting types and rejecting
    unknown keys.

    Raises:
        UsageError: listing every unknown key (with the nearest field name) and every bad value.
    """
    fields = flat_fields(cls)
    problems, values = [], {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            problems.append(f'unknown key "{key}".{did_you_mean(name, fields)}')
            continue
        try:
            values[name] = _converter(fields[name].type)(raw) if raw is not None else None
        except ValueError as e:
            problems.append(f'"{key}": {e}')
    if problems:
        raise UsageError(
            f"{source} has problems:\n" + "\n".join(f"  - {p}" for p in problems)
            + f"\n  Valid keys: {', '.join(sorted(fields))}"
        )
    return cls(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error for a missing or malformed file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist. Pass the path of a YAML file to --config.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of key: value, not {type(data).__name__}.")
    return data


def build_config(cls: type[T], args: argparse.Namespace, yaml_data: dict[str, Any] | None = None,
                 source: str = "config") -> T:
    """defaults < yaml_data < flags present in `args`. Unknown YAML keys are rejected."""
    names = set(flat_fields(cls))
    merged = dict(yaml_data or {})
    merged.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_dict(cls, merged, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe, flat dict of a config dataclass (groups flattened, Paths become strings)."""
    def clean(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return v
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_group(f):
            out.update({k: v for k, v in to_dict(value).items() if k not in f.metadata["exclude"]})
        else:
            out[f.name] = clean(value)
    return out


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a config as indented JSON (written to a temporary name, then renamed)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    tmp.replace(p)
