"""Background prefetching: same batches in the same order, producer errors re-raised, clean shutdown."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from twotower.data.dataset import Interactions, iterate_batches
from twotower.data.prefetch import Prefetcher, prefetched


def _data(n: int = 1000) -> Interactions:
    g = torch.Generator().manual_seed(0)
    return Interactions(torch.randint(0, 50, (n,), generator=g), torch.randint(0, 80, (n,), generator=g))


def test_same_batches_in_the_same_order():
    data = _data()
    want = list(iterate_batches(data, 64, seed=1, epoch=2))
    got = list(Prefetcher(iterate_batches(data, 64, seed=1, epoch=2), depth=3))
    assert len(got) == len(want) == 16
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_are_built_on_another_thread_ahead_of_the_consumer():
    produced: list[tuple[int, str]] = []

    def source():
        for i in range(6):
            produced.append((i, threading.current_thread().name))
            yield {"i": torch.tensor([i])}

    it = iter(Prefetcher(source(), depth=2))
    assert int(next(it)["i"]) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:  # the queue (2) fills while we wait
        time.sleep(0.01)
    assert len(produced) >= 3 and all(name == "twotower-prefetch" for _, name in produced)
    assert len(produced) <= 4  # bounded: one handed out, two queued, one being built
    assert [int(b["i"]) for b in it] == [1, 2, 3, 4, 5]


def test_producer_exception_reaches_the_consumer_after_the_good_batches():
    def source():
        yield {"x": torch.zeros(2)}
        yield {"x": torch.ones(2)}
        raise KeyError("column 'item_id' missing in row group 3")

    got = []
    with pytest.raises(KeyError, match="row group 3"):
        for batch in Prefetcher(source()):
            got.append(batch)
    assert len(got) == 2


def test_breaking_early_stops_the_producer_and_runs_its_cleanup():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield {"i": torch.tensor([i])}
                i += 1
        finally:
            closed.set()

    prefetcher = Prefetcher(endless(), depth=2)
    for batch in prefetcher:
        if int(batch["i"]) == 3:
            break
    assert closed.wait(5) and not prefetcher._thread.is_alive()


def test_prefetched_wraps_an_epoch_callable_and_rejects_bad_depth():
    data = _data(300)
    batches = prefetched(lambda epoch: iterate_batches(data, 100, seed=0, epoch=epoch), depth=1)
    for epoch in (1, 2):
        want = list(iterate_batches(data, 100, seed=0, epoch=epoch))
        got = list(batches(epoch))
        assert all(torch.equal(a["item_idx"], b["item_idx"]) for a, b in zip(got, want, strict=True))
    prefetcher = Prefetcher(iter([]))
    assert list(prefetcher) == []
    with pytest.raises(RuntimeError, match="iterated once"):
        list(prefetcher)
    with pytest.raises(ValueError):
        Prefetcher(iter([]), depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_copies_arrive_complete_on_the_gpu():
    data = _data()
    want = list(iterate_batches(data, 128, seed=0, epoch=1))
    got = list(Prefetcher(iterate_batches(data, 128, seed=0, epoch=1), device="cuda"))
    assert all(b["user_idx"].is_cuda for b in got)
    assert all(torch.equal(a["user_idx"].cpu(), b["user_idx"]) for a, b in zip(got, want, strict=True))
