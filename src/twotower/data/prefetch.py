"""Batches prepared on a background thread while the training thread computes the previous step.

``Prefetcher(batches, depth=2)`` iterates ``batches`` on a daemon thread into a bounded queue and
yields the same batches, in the same order, on the calling thread. The producer's work - reading
and decoding Parquet row groups, shuffling, gathering rows, pinning and copying to a GPU - then
overlaps the step instead of adding to it. Threads (not processes) suffice because that work
happens in numpy, pyarrow and torch kernels that release the GIL, and batches are handed over
without any pickling or copy.

Guarantees the training loop relies on:

- order and content are exactly those of the wrapped iterable (a single producer, a FIFO queue);
- an exception raised by the producer is re-raised in the consumer, at the position of the batch
  that failed, with the producer's traceback;
- at most ``depth`` batches wait in the queue (plus the one being built), so memory stays bounded;
- leaving the loop early (``break``, an exception in the step, garbage collection) stops the
  producer and joins its thread; nothing keeps running in the background.

``device`` (optional) moves every tensor of a batch there on the producer thread; for CUDA the batch
is pinned first and copied with ``non_blocking=True`` on a side stream that the consumer waits on,
so host-to-device copies overlap compute as well.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["Prefetcher", "prefetched"]

Batch = dict[str, Tensor]
_DONE = object()  # end-of-stream marker put by the producer


class _Failure:
    """An exception raised by the producer, carried to the consumer through the queue."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Iterate ``batches`` on a background thread, ``depth`` batches ahead (see the module docstring)."""

    def __init__(self, batches: Iterable[Batch], depth: int = 2, device: str | torch.device | None = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._source = batches
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._device = torch.device(device) if device is not None else None
        self._stream = None
        if self._device is not None and self._device.type == "cuda":
            self._stream = torch.cuda.Stream(self._device)
        self._thread = threading.Thread(target=self._produce, name="twotower-prefetch", daemon=True)
        self._started = False
        self._finished = False

    # --- producer (background thread) ------------------------------------------------------------

    def _produce(self) -> None:
        try:
            for batch in self._source:
                if self._stop.is_set():
                    return
                if not self._put(self._to_device(batch)):
                    return
            self._put(_DONE)
        except BaseException as exc:  # everything goes to the consumer, which re-raises it
            self._put(_Failure(exc))
        finally:
            close = getattr(self._source, "close", None)  # a generator source: run its cleanup here
            if close is not None:
                close()

    def _put(self, item: Any) -> bool:
        """Block until there is room, but give up when the consumer has gone away."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _to_device(self, batch: Batch) -> Any:
        if self._device is None:
            return batch
        if self._stream is None:
            return {k: v.to(self._device) for k, v in batch.items()}
        with torch.cuda.stream(self._stream):
            moved = {k: v.pin_memory().to(self._device, non_blocking=True) for k, v in batch.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    # --- consumer (calling thread) ---------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise RuntimeError("a Prefetcher is iterated once; make a new one per epoch")
        self._started = True
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    self._finished = True
                    return
                if isinstance(item, _Failure):
                    self._finished = True
                    raise item.error
                if self._stream is not None:
                    item, event = item
                    current = torch.cuda.current_stream(self._device)
                    event.wait(current)  # the copy is done before the step uses it
                    for tensor in item.values():
                        # Allocated on the side stream, used on this one: keep the caching allocator
                        # from handing the memory out again before this stream is done with it.
                        tensor.record_stream(current)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer and wait for its thread (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            # Unblock a producer waiting on a full queue, then join it.
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)


def prefetched(
    batches: Callable[[int], Iterable[Batch]], depth: int = 2, device: str | torch.device | None = None
) -> Callable[[int], Iterator[Batch]]:
    """Wrap a ``batches(epoch)`` callable (what ``twotower.train.fit`` takes) so each epoch prefetches."""

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        return iter(Prefetcher(batches(epoch), depth=depth, device=device))

    return epoch_batches
