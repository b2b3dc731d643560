"""TensorBoard scalars: both writers produce event files TensorBoard (and the demo) can read."""

import pytest

from projects.moving_digits import demo
from aim_jax.metric_writer import ScalarWriter


@pytest.mark.parametrize('backend', ['tf', 'tensorboardx'])
def test_scalars_round_trip_through_event_files(tmp_path, backend):
  w = ScalarWriter(str(tmp_path), backend=backend)
  assert w.backend == backend
  for step, loss in ((25, 2.5), (50, 1.25)):
    w.scalar('train/loss', loss, step)
  w.scalar('test/top1', 0.75, 50)
  w.flush()
  w.close()
  got = demo.event_scalars(tmp_path)
  assert got['train/loss'] == [(25, 2.5), (50, 1.25)]
  assert got['test/top1'] == [(50, 0.75)]


def test_unknown_backend_is_named():
  with pytest.raises(ValueError, match='tensorboardx'):
    ScalarWriter('/tmp/unused', backend='tensorboard')
