"""Batches placed on the devices ahead of the step that consumes them.

The training loop's host work per step (pulling a batch out of tf.data, the skip
accounting, building the global array) runs in a background thread, `size` batches
ahead, so it overlaps the previous steps' device compute instead of sitting between
two dispatches.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetcher:
  """Iterator of `put(batch)` for the batches of `it`, produced `size` ahead in a thread.

  An exception raised by `it` or `put` (a skip rate above `data.max_skip_rate`, a decode
  error) is re-raised by the `next()` that would have returned that batch. `close()`
  stops the thread; the batches it had prepared are dropped (a resumed run restarts the
  data stream from its checkpoint's step, not from this iterator).
  """

  def __init__(self, it: Iterator[Any], put: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise ValueError(f'device prefetch size must be >= 1, got {size}')
    self._it, self._put = it, put
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='device-prefetch', daemon=True)
    self._thread.start()

  def _offer(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      for batch in self._it:
        if not self._offer(self._put(batch)):
          return
      self._offer(_Failure(StopIteration()))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._offer(_Failure(e))

  def __iter__(self) -> 'DevicePrefetcher':
    return self

  def __next__(self) -> Any:
    item = self._queue.get()
    if isinstance(item, _Failure):
      self._offer(item)            # every later next() fails the same way
      raise item.error
    return item

  def close(self) -> None:
    self._stop.set()
    while True:                    # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)
