"""One writer per shard on object storage: a lease object (there is no flock on S3 or GCS).

    STORE/shard_XXXXX/.lease     JSON {host, pid, token, acquired_at, heartbeat_at, ttl_s}

    acquire   create .lease only if absent (S3: conditional put, If-None-Match: *). If one exists:
                live  ->  refuse, naming host, pid and the last heartbeat
                stale ->  replace it only if it is still that stale object (S3: If-Match on its
                          ETag); a writer that loses this race is refused
              stale  <=>  now - heartbeat_at > ttl_s,  or  host == this host and pid is not running
              then read it back: the token must be ours (a server that ignores the conditions
              lets the last of two writers win; the other is refused here)
    hold      a daemon thread rewrites heartbeat_at every ttl_s / 5 seconds (S3: If-Match on our
              last ETag), and the writer calls `check()` before it publishes a chunk and again
              before the manifest: it reads the lease back and raises if another writer holds it
    release   delete .lease if it is still ours

Limits (also in docs/scale-out.md): staleness compares the holder's clock with the reader's, so
clocks must agree to well within ttl_s; a writer paused longer than ttl_s (a suspended VM) can
lose its lease and is stopped at its next check, but one publish already past its check can
still land; backends without conditional puts (anything but S3 here) use a read-then-write, which
two writers starting within the same second can both pass. The dead-pid shortcut trusts that
host names are unique (as they are across machines and pods).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from saelab.atomic import pid_running
from saelab.errors import UsageError
from saelab.store.remote import RemotePath, backend_errors, create_exclusive

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
LEASE_TTL_S = 300.0
"""A lease whose holder has not written a heartbeat for this long is stale (another writer may take it)."""


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_lease(shard_dir: RemotePath) -> tuple[dict | None, str]:
    """(lease content or None, its ETag or "")."""
    path = shard_dir / LEASE_FILE
    try:
        with backend_errors(path, "read"):
            etag = str(path.fs.info(path.key).get("ETag", "")) if path.protocol in ("s3", "s3a") else ""
            raw = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    try:
        return json.loads(raw), etag
    except (ValueError, UnicodeDecodeError):
        return {"host": "?", "pid": 0, "token": "", "heartbeat_at": 0.0, "ttl_s": 0.0}, etag  # damaged: stale


def is_stale(lease: dict, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat_at", 0.0)) > float(lease.get("ttl_s", LEASE_TTL_S)):
        return True
    return lease.get("host") == socket.gethostname() and not pid_running(int(lease.get("pid", 0)))


def lease_is_live(shard_dir: RemotePath) -> bool:
    """True when a writer holds a lease on the shard that is not stale (for `verify` and `monitor`)."""
    lease, _ = read_lease(shard_dir)
    return lease is not None and not is_stale(lease)


def held_error(shard_dir: RemotePath, shard: int, root, lease: dict) -> UsageError:
    path = shard_dir / LEASE_FILE
    beat = float(lease.get("heartbeat_at", 0.0))
    ttl = float(lease.get("ttl_s", LEASE_TTL_S))
    return UsageError(
        f"shard {shard} of {root} is being written by another process (pid {lease.get('pid')} on host "
        f"{lease.get('host')}, holding the lease {path}; last heartbeat {time.time() - beat:.0f} s ago). Wait for "
        f"it to finish, stop it, or give this run another --shard. If that writer is dead, its lease goes stale at "
        f"{_now_iso(beat + ttl)} ({ttl:.0f} s after its last heartbeat); deleting {path} lets a writer take over now.")


class Lease:
    """This process's hold on one shard; see the module docstring. Get one with `Lease.acquire`."""

    def __init__(self, shard_dir: RemotePath, shard: int, token: str, etag: str, acquired_at: float,
                 ttl_s: float = LEASE_TTL_S):
        self.path, self.shard, self.token, self.etag = shard_dir / LEASE_FILE, shard, token, etag
        self.acquired_at, self.ttl_s = acquired_at, ttl_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread = threading.Thread(target=self._beat, name=f"saelab-lease-{shard}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, shard_dir: RemotePath, shard: int, root, ttl_s: float = LEASE_TTL_S) -> Lease:
        """Take the shard's lease, or raise a UsageError naming the live holder."""
        token, now = uuid.uuid4().hex, time.time()
        body = cls._body(token, now, now, ttl_s)
        path = shard_dir / LEASE_FILE
        etag = create_exclusive(path, body)
        if etag is None:
            lease, old_etag = read_lease(shard_dir)
            if lease is not None and not is_stale(lease):
                raise held_error(shard_dir, shard, root, lease)
            if lease is not None:
                log.warning("taking over the stale lease of shard %d (pid %s on host %s, last heartbeat %s)", shard,
                            lease.get("pid"), lease.get("host"), _now_iso(float(lease.get("heartbeat_at", 0.0))))
            etag = cls._replace(path, body, old_etag) if lease is not None else create_exclusive(path, body)
        # read back: a server that ignores the conditions lets the last of two writers win; the other stops here
        lease, _ = read_lease(shard_dir)
        if etag is None or lease is None or lease.get("token") != token:
            raise held_error(shard_dir, shard, root, lease or {"host": "?", "pid": "?"})
        return cls(shard_dir, shard, token, etag, now, ttl_s)

    @staticmethod
    def _body(token: str, acquired_at: float, heartbeat_at: float, ttl_s: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                           "acquired_at": acquired_at, "heartbeat_at": heartbeat_at, "ttl_s": ttl_s}).encode()

    @staticmethod
    def _replace(path: RemotePath, body: bytes, etag: str) -> str | None:
        """Overwrite `path` only if its ETag is still `etag` (S3); None if it changed meanwhile."""
        if path.protocol in ("s3", "s3a") and etag:
            try:
                out = path.fs.pipe_file(path.key, body, IfMatch=etag)
            except OSError as e:
                if isinstance(e, (PermissionError, FileNotFoundError)):
                    raise
                return None  # 412 Precondition Failed: another writer replaced it first
            return str((out or {}).get("ETag", ""))
        path.write_bytes(body)
        return ""

    # -- holding
    def refresh(self) -> None:
        """Write a new heartbeat if the lease is still ours; remember the loss otherwise."""
        with self._lock:
            if self._lost:
                return
            lease, etag = read_lease(self.path.parent)
            if lease is None or lease.get("token") != self.token:
                holder = f"pid {lease.get('pid')} on host {lease.get('host')}" if lease else "nobody (it was deleted)"
                self._lost = holder
                return
            new = self._replace(self.path, self._body(self.token, self.acquired_at, time.time(), self.ttl_s),
                                etag or self.etag)
            if new is None:
                self._lost = "another writer (the lease changed while it was renewed)"
            else:
                self.etag = new

    def check(self) -> None:
        """Renew the lease now; raise if this writer no longer holds it (nothing more may be published)."""
        self.refresh()
        if self._lost:
            raise UsageError(f"this writer lost the lease of shard {self.shard} ({self.path}) to {self._lost}: another "
                             f"writer took it after this one went silent for over {self.ttl_s:.0f} s. It stopped "
                             "before publishing anything more; the chunks its manifest lists are intact. Run one "
                             "writer per shard.")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried; check() reports a loss
                log.warning("could not renew the lease %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            try:
                lease, _ = read_lease(self.path.parent)
                if lease is not None and lease.get("token") == self.token:
                    self.path.unlink(missing_ok=True)
            except (UsageError, OSError) as e:
                log.warning("could not delete the lease %s (it goes stale by itself): %s", self.path, e)
