"""Device prefetch: same batches in the same order, errors surface at the right batch."""

import threading

import numpy as np
import pytest

from aim_jax.prefetch import DevicePrefetcher


def test_yields_put_of_every_batch_in_order_then_stops():
  seen_threads = set()

  def put(x):
    seen_threads.add(threading.current_thread().name)
    return x * 10

  out = list(DevicePrefetcher(iter(range(7)), put, size=2))
  assert out == [0, 10, 20, 30, 40, 50, 60]
  assert seen_threads == {'device-prefetch'}     # the host work ran off the main thread


def test_an_error_in_the_stream_is_raised_where_its_batch_would_be():
  def stream():
    yield 1
    yield 2
    raise RuntimeError('Skipped 3 of 10 clips, above data.max_skip_rate')

  it = DevicePrefetcher(stream(), lambda x: x, size=3)
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(RuntimeError, match='max_skip_rate'):
    next(it)
  with pytest.raises(RuntimeError, match='max_skip_rate'):   # and stays failed
    next(it)


def test_close_stops_a_producer_blocked_on_a_full_queue():
  def endless():
    i = 0
    while True:
      yield np.full(4, i)
      i += 1

  it = DevicePrefetcher(endless(), lambda x: x, size=1)
  np.testing.assert_array_equal(next(it), np.zeros(4))
  it.close()
  assert not it._thread.is_alive()


def test_size_must_be_positive():
  with pytest.raises(ValueError, match='>= 1'):
    DevicePrefetcher(iter([]), lambda x: x, size=0)
