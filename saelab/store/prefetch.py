"""Read-ahead for stores on object storage: chunks fetched in a background thread, in a known order.

A remote chunk is read whole (and its sha256 checked) before any row of it is used, so the reader
of a batch stream would wait for the network at every chunk. `Prefetcher` runs the reads of the
next `depth` chunks in one daemon thread while the caller works on the current one:

    order     = the chunks the caller will ask for, in the order it will ask (known in advance:
                batches.py draws the epoch's chunk order from the seed)
    thread    for c in order: queue.put((c, read(c)))       the queue holds at most `depth` arrays
    caller    get(c) = the next queue item, which must be c

Nothing about the result changes: the same reads in the same order, done earlier. Memory: up to
`depth` + 1 chunks beyond what the caller holds. A read error is raised by `get` of that chunk, in
the caller's thread. Local stores do not use this (memory-mapped reads are lazy already).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_DONE = object()


class Prefetcher:
    """Run `read(item)` for each item of `order` in a background thread, at most `depth` ahead."""

    def __init__(self, read: Callable[[Any], Any], order: Iterable, depth: int = 2):
        assert depth >= 1, f"prefetch depth must be >= 1, got {depth}"
        self._read, self._order = read, iter(order)
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saelab-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for key in self._order:
                if self._stop.is_set():
                    return
                try:
                    value = (key, self._read(key), None)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by get()
                    self._put((key, None, e))
                    return
                if not self._put(value):
                    return
        except BaseException as e:  # noqa: BLE001 - an error while drawing the order itself
            self._put((None, None, e))
            return
        self._put((_DONE, None, None))

    def get(self, key) -> Any:
        """The value read for `key`, which must be the next item of the order."""
        got, value, err = self._q.get()
        if err is not None:
            raise err
        assert got == key, f"prefetch order diverged from the reads: expected {key!r}, the thread read {got!r}"
        return value

    def close(self) -> None:
        """Stop the thread: a read in flight finishes in the background and is dropped."""
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=1.0)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
