"""TensorBoard scalars: the event files are byte for byte what TensorFlow writes and reads."""

import numpy as np
import pytest
import tensorflow as tf

from aim_jax import metric_writer
from aim_jax.metric_writer import ScalarWriter
from projects.moving_digits import demo


def test_scalars_round_trip_through_tensorflows_reader(tmp_path):
  w = ScalarWriter(str(tmp_path))
  for step, loss in ((25, 2.5), (50, 1.25)):
    w.scalar('train/loss', loss, step)
  w.scalar('test/top1', 0.75, 50)
  w.flush()
  w.close()
  got = demo.event_scalars(tmp_path)
  assert got['train/loss'] == [(25, 2.5), (50, 1.25)]
  assert got['test/top1'] == [(50, 0.75)]
  events = [tf.compat.v1.Event.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(w.path))]
  assert events[0].file_version == 'brain.Event:2'
  assert all(abs(e.wall_time - events[0].wall_time) < 60 for e in events)


def test_a_second_writer_starts_its_own_file(tmp_path):
  a, b = ScalarWriter(str(tmp_path)), ScalarWriter(str(tmp_path))
  a.scalar('x', 1.0, 1)
  b.scalar('x', 2.0, 2)
  a.close()
  b.close()
  assert a.path != b.path and a.path.name.startswith('events.out.tfevents.')
  assert demo.event_scalars(tmp_path)['x'] == [(1, 1.0), (2, 2.0)]


def test_event_bytes_equal_tensorflows_serialization():
  for step in (0, 7, 300, 2**40, -1):
    e = tf.compat.v1.Event(wall_time=1732998000.25, step=step)
    e.summary.value.add(tag='train/loss', simple_value=1.5)
    e.summary.value.add(tag='lr', simple_value=3e-4)
    got = metric_writer.event(1732998000.25, step, scalars={'train/loss': 1.5, 'lr': 3e-4})
    assert got == e.SerializeToString(), step
  v = tf.compat.v1.Event(wall_time=0.5, step=0, file_version='brain.Event:2')
  assert metric_writer.event(0.5, 0, file_version='brain.Event:2') == v.SerializeToString()
  z = tf.compat.v1.Event(wall_time=0.0, step=3)
  z.summary.value.add(tag='zero', simple_value=0.0)
  assert metric_writer.event(0.0, 3, scalars={'zero': 0.0}) == z.SerializeToString()


def test_record_framing_equals_tfrecordwriter_and_crcs_are_checked(tmp_path):
  assert metric_writer.crc32c(b'123456789') == 0xE3069283      # CRC-32C check value
  payloads = [b'', b'x', bytes(range(256)) * 3]
  path = str(tmp_path / 'tf.tfrecord')
  with tf.io.TFRecordWriter(path) as f:
    for p in payloads:
      f.write(p)
  ours = b''.join(metric_writer.tfrecord(p) for p in payloads)
  assert ours == (tmp_path / 'tf.tfrecord').read_bytes()
  # A flipped data byte fails TensorFlow's data CRC check (so the CRCs are the real ones).
  bad = bytearray(metric_writer.tfrecord(b'hello'))
  bad[13] ^= 1
  (tmp_path / 'bad.tfrecord').write_bytes(bytes(bad))
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(str(tmp_path / 'bad.tfrecord')))


def test_values_round_to_float32_as_tensorboard_stores_them(tmp_path):
  w = ScalarWriter(str(tmp_path))
  w.scalar('v', 0.1, 3)
  w.close()
  assert demo.event_scalars(tmp_path)['v'] == [(3, float(np.float32(0.1)))]
