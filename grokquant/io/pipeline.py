"""Overlapping the stages of a streaming job: an iterator run ahead on a thread, a sink fed behind on one.

`convert` reads and merges a tensor, quantizes it and writes the bytes. Reading (page faults in the mapped
shards, the copy that merges the TP slices) and writing (file I/O) release the GIL, so on their own threads
they proceed while the quantizers work, and the wall time tends to the slowest stage rather than the sum.
The queues are bounded, so memory stays at a few items; an error on either thread is raised in the caller,
and leaving early (an exception, Ctrl-C) stops both threads without waiting for the rest of the work.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_POLL_S = 0.1  # how often a blocked thread looks whether the other side has gone
_DONE = object()


def read_ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """The items of `items`, produced on a background thread at most `depth` ahead of the consumer
    (so at most depth + 2 exist at once: the consumer's, the queued ones, the one being made)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    gone = threading.Event()

    def put(entry) -> bool:
        while not gone.is_set():
            try:
                q.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_DONE, e))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        gone.set()
        thread.join()


class WriteBehind:
    """Calls `write(item)` on a background thread in submission order, at most `depth` items waiting.
    An error of `write` is raised by the next `submit` or by `close`; `abort` drops what is still queued."""

    def __init__(self, write: Callable[[object], None], depth: int = 2):
        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._gone = threading.Event()
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE or self._gone.is_set():
                return
            try:
                self._write(item)
            except BaseException as e:
                self._error = e
                self._gone.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, item) -> None:
        while True:
            self._raise()
            if self._gone.is_set():
                raise RuntimeError("write-behind thread has stopped")
            try:
                self._q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                pass

    def close(self) -> None:
        """Wait until everything submitted is written; raise the writer's error, if any."""
        if not self._gone.is_set():
            while self._thread.is_alive():
                try:
                    self._q.put(_DONE, timeout=_POLL_S)
                    break
                except queue.Full:
                    pass
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the item being written; the rest is dropped."""
        self._gone.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        try:
            self._q.put_nowait(_DONE)
        except queue.Full:
            pass
        self._thread.join()
