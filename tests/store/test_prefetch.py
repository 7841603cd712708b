"""Prefetcher: reads in a background thread, in order, at most `depth` ahead; errors reach the caller."""
from __future__ import annotations

import threading
import time

import pytest

from saelab.store.prefetch import Prefetcher


def test_values_come_in_order_and_the_thread_stays_at_most_depth_ahead():
    started, lock = [], threading.Lock()

    def read(i):
        with lock:
            started.append(i)
        return i * i

    with Prefetcher(read, range(10), depth=2) as pf:
        time.sleep(0.3)  # let the thread run as far ahead as it may
        assert len(started) <= 2 + 1, started  # depth queued + one read in flight
        assert [pf.get(i) for i in range(10)] == [i * i for i in range(10)]
    assert started == list(range(10))


def test_a_read_error_is_raised_by_get_of_that_item_in_the_callers_thread():
    def read(i):
        if i == 3:
            raise ValueError("chunk 3 is corrupted")
        return i

    pf = Prefetcher(read, range(6), depth=2)
    assert [pf.get(i) for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="chunk 3"):
        pf.get(3)
    pf.close()


def test_close_stops_an_endless_order():
    reads = []

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    pf = Prefetcher(reads.append, endless(), depth=1)
    pf.get(0)
    pf.close()
    n = len(reads)
    time.sleep(0.3)
    assert len(reads) <= n + 1 and not pf._thread.is_alive()
