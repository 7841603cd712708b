"""Stores on object storage: the one module that talks to fsspec.

Owns telling a URL from a local path (`location`), `RemotePath` (the few pathlib operations the
store uses, over an fsspec filesystem), atomic puts, exclusive creates, and turning a backend's
errors into messages a person can act on. Leaves out: local files (a plain path, or a file:// URL,
stays a `pathlib.Path` and keeps memmap, flock and fsync) and the one-writer-per-shard lease
(lease.py).

    location("s3://bucket/run")    -> RemotePath  (protocol "s3", key "bucket/run")
    location("gs://bucket/run")    -> RemotePath  (protocol "gs")
    location("file:///data/run")   -> Path("/data/run")
    location("data/run")           -> Path("data/run")

Publishing an object (`put_atomic`, `upload_atomic`):

    1. write  <dir>/<name>.tmp-<uuid4 hex>      (a key no reader looks at)
    2. check  size(tmp) == len(data)
    3. move   tmp -> <dir>/<name>               (server-side copy + delete on S3 and GCS)

A chunk file is published this way before the shard manifest that lists it, so a reader (which
only reads what a manifest lists) never sees a chunk that is not whole. `is_tmp_name` tells the
temporary keys that a crash can leave; the shard's next writer deletes them.

`create_exclusive` writes an object only if none exists: a conditional put (`If-None-Match: *`) on
S3, which AWS S3 and most S3-compatible servers enforce; on other backends a check followed by a
put (a small race, documented in docs/scale-out.md).

Credentials and endpoints come from each backend's own standard places: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL and ~/.aws for S3; application default
credentials for GCS. Listings are never cached (a shard's files change while it is watched).
"""
from __future__ import annotations

import hashlib
import re
import uuid
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlparse

from saelab.errors import UsageError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""URL scheme -> the saelab extra that installs its fsspec backend."""
_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_ONE_SLASH_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)")
_TMP_RE = re.compile(r"\.tmp(-[0-9a-f]{32})?$")


def is_tmp_name(name: str) -> bool:
    """A temporary file or key a writer leaves when interrupted: `x.tmp` (local) or `x.tmp-<uuid>`."""
    return bool(_TMP_RE.search(name))


def location(where: str | Path | RemotePath) -> Path | RemotePath:
    """A store location: a `RemotePath` for an fsspec URL, else a `pathlib.Path`.

    Raises:
        UsageError: a URL that names no bucket, a scheme fsspec does not know, a missing backend
            (naming the extra to install), or a path that looks like a URL with one slash.
    """
    if isinstance(where, (Path, RemotePath)):
        return where
    where = str(where)
    m = _URL_RE.match(where)
    if not m:
        bad = _ONE_SLASH_RE.match(where)
        if bad and len(bad.group(1)) > 1:  # not a Windows drive letter
            raise UsageError(f"{where!r} looks like a URL with one slash after '{bad.group(1)}:'. Write "
                             f"{bad.group(1)}://{where[len(bad.group(0)):]} for object storage, or ./{where} "
                             "for a local directory of that name.")
        return Path(where)
    scheme = m.group(1).lower()
    if scheme == "file":
        parsed = urlparse(where)
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"{where}: a file:// URL names a local path (file:///abs/path); host "
                             f"{parsed.netloc!r} is not this machine. Mount it, or use its object-storage URL.")
        return Path(unquote(parsed.path))
    key = where[m.end():].strip("/")
    if not key or key.startswith("/"):
        raise UsageError(f"{where} names no bucket: write {scheme}://BUCKET/PATH/TO/STORE.")
    return RemotePath(filesystem(scheme, where), scheme, re.sub("/+", "/", key))


def filesystem(scheme: str, url: str = ""):
    """The fsspec filesystem for `scheme` (listings never cached), or a UsageError naming the install."""
    extra = EXTRAS.get(scheme)
    install = f"pip install 'saelab[{extra}]'" if extra else None
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url or scheme + '://'} is on object storage, which needs fsspec and its backend: "
                         f"{install or 'pip install fsspec and the backend for ' + scheme + '://'}.") from None
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except ValueError:
        known = ", ".join(sorted(f"{p}://" for p in EXTRAS))
        raise UsageError(f"{url}: fsspec knows no storage called {scheme!r}. saelab stores live on a local path "
                         f"or at {known} (or any other fsspec URL).") from None
    except ImportError as e:
        raise UsageError(f"{url} needs the fsspec backend for {scheme}:// ({e}). Install it: "
                         f"{install or 'see the message above'}.") from None
    return cls(use_listings_cache=False)


class Stat(NamedTuple):
    """What `RemotePath.stat()` gives: the fields the store reads."""

    st_size: int
    st_mtime: float


class RemotePath:
    """A file or directory (key prefix) on object storage, with the pathlib methods the store uses.

    Children returned by `iterdir` carry the size and kind from the listing, so stat() on them costs
    no request. Object storage has no empty directories: `mkdir` does nothing, and `iterdir` of a
    prefix holding nothing is empty. Backend errors other than a missing key become UsageErrors.
    """

    def __init__(self, fs, protocol: str, key: str, size: int | None = None, kind: str | None = None,
                 mtime: float | None = None):
        self.fs, self.protocol, self.key = fs, protocol, key.rstrip("/")
        self._size, self._kind, self._mtime = size, kind, mtime

    # -- names
    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.fs, self.protocol, f"{self.key}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.protocol, self.key.rsplit("/", 1)[0]) if "/" in self.key else self

    @property
    def parents(self) -> list[RemotePath]:
        out, p = [], self
        while "/" in p.key:
            p = p.parent
            out.append(p)
        return out

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other: RemotePath) -> bool:
        return self.key < other.key

    def __hash__(self) -> int:
        return hash(str(self))

    # -- queries
    def _info(self) -> dict | None:
        with backend_errors(self, "read"):
            try:
                return self.fs.info(self.key)
            except FileNotFoundError:
                return None

    def exists(self) -> bool:
        return self._kind is not None or self._info() is not None

    def is_file(self) -> bool:
        kind = self._kind or (self._info() or {}).get("type")
        return kind == "file"

    def is_dir(self) -> bool:
        kind = self._kind or (self._info() or {}).get("type")
        return kind == "directory"

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> Stat:
        if self._size is None:
            info = self._info()
            if info is None:
                raise FileNotFoundError(str(self))
            self._size, self._mtime = int(info.get("size") or 0), _mtime(info)
        return Stat(self._size, self._mtime or 0.0)

    def iterdir(self) -> list[RemotePath]:
        """The keys and prefixes directly under this one ([] if there are none)."""
        with backend_errors(self, "list"):
            try:
                entries = self.fs.ls(self.key, detail=True)
            except FileNotFoundError:
                return []
        out = []
        for e in entries:
            key = e["name"].rstrip("/")
            if key == self.key:
                continue
            out.append(RemotePath(self.fs, self.protocol, key, int(e.get("size") or 0), e.get("type"), _mtime(e)))
        return out

    def glob(self, pattern: str) -> list[RemotePath]:
        """Children whose name matches `pattern` (one level, fnmatch rules)."""
        return [p for p in self.iterdir() if fnmatch(p.name, pattern)]

    # -- reads and writes
    def read_bytes(self) -> bytes:
        with backend_errors(self, "read"):
            return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes, **conditions) -> dict:
        """A plain put (one request, atomic for its readers); `conditions` pass to the backend."""
        with backend_errors(self, "write"):
            return self.fs.pipe_file(self.key, data, **conditions) or {}

    def unlink(self, missing_ok: bool = False) -> None:
        with backend_errors(self, "delete"):
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once a key under it does."""


def _mtime(info: dict) -> float | None:
    t = info.get("LastModified") or info.get("mtime") or info.get("updated")
    return t.timestamp() if hasattr(t, "timestamp") else (float(t) if isinstance(t, (int, float)) else None)


def _tmp_key(path: RemotePath) -> RemotePath:
    return path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"


def put_atomic(path: RemotePath, data: bytes) -> None:
    """Publish `data` at `path` through a temporary key (see the module docstring)."""
    _publish(path, len(data), lambda tmp: path.fs.pipe_file(tmp.key, data))


def upload_atomic(path: RemotePath, local: Path) -> None:
    """Publish the local file `local` at `path` through a temporary key."""
    _publish(path, local.stat().st_size, lambda tmp: path.fs.put_file(str(local), tmp.key))


def _publish(path: RemotePath, nbytes: int, write) -> None:
    tmp = _tmp_key(path)
    with backend_errors(path, "write"):
        try:
            write(tmp)
            size = int(path.fs.info(tmp.key).get("size") or 0)
            if size != nbytes:
                raise UsageError(f"uploading {path} stored {size:,} of {nbytes:,} bytes. Every completed chunk is "
                                 "intact; re-run the same command: it resumes from the last complete chunk.")
            path.fs.mv(tmp.key, path.key)
        except BaseException:
            try:
                path.fs.rm_file(tmp.key)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise


def create_exclusive(path: RemotePath, data: bytes) -> str | None:
    """Write `data` at `path` only if nothing is there. Returns the new object's ETag ("" when the
    backend gives none), or None when the object already existed."""
    if path.protocol in ("s3", "s3a"):
        try:
            out = path.write_bytes(data, IfNoneMatch="*")
        except FileExistsError:
            return None
        return str(out.get("ETag", ""))
    if path.exists():
        return None
    put_atomic(path, data)
    return ""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def backend_errors(path: RemotePath, action: str):
    """Turn a backend's errors into UsageErrors that say what to check; FileNotFoundError of a key
    passes through (callers decide what a missing key means), a missing bucket does not."""
    try:
        yield
    except (UsageError, FileExistsError):
        raise
    except FileNotFoundError as e:
        if "bucket" in str(e).lower():
            raise UsageError(f"cannot {action} {path}: the bucket {path.key.split('/')[0]!r} does not exist "
                             "(or these credentials cannot see it). Create it first, or fix the URL.") from None
        raise
    except PermissionError as e:
        raise UsageError(f"cannot {action} {path}: access denied ({e}). Check the credentials this process "
                         f"gets ({_CREDS.get(path.protocol, 'the backend’s standard ones')}) and their "
                         "permissions on the bucket.") from None
    except Exception as e:  # noqa: BLE001 - botocore/google errors are not OSErrors; name them once here
        mod = type(e).__module__ or ""
        if not isinstance(e, OSError) and not mod.startswith(("botocore", "aiobotocore", "google", "gcsfs", "s3fs",
                                                               "aiohttp", "requests")):
            raise
        name = type(e).__name__
        hint = ("no credentials were found: " + _CREDS.get(path.protocol, "configure the backend")
                if "Credentials" in name else
                "check AWS_ENDPOINT_URL (or the backend's endpoint) and the network" if "Endpoint" in name
                or "Connect" in name else "the backend refused or failed the request")
        again = " Every completed chunk is intact; re-running the same command resumes." if action == "write" else ""
        raise UsageError(f"cannot {action} {path}: {name}: {e}. {hint[0].upper()}{hint[1:]}.{again}") from None


_CREDS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or ~/.aws/credentials; "
          "AWS_ENDPOINT_URL for an S3-compatible server",
    "gs": "gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS",
}
_CREDS["s3a"], _CREDS["gcs"] = _CREDS["s3"], _CREDS["gs"]
