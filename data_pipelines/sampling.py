"""Frame-index samplers, run on the encoded frame list *before* any JPEG is decoded.

All samplers follow the official AIM/mmaction2 `SampleFrames` arithmetic (docs/sampling.md) so
a clip sampled here is the clip the official recipe would sample from the same frames:

* dense training: one clip of `clip_len` frames `interval` apart at a random offset in
  `[0, n - clip_len*interval]`; when the video is shorter, offset 0 and indices wrap around
  (`out_of_bound_opt='loop'`).
* dense test: `num_clips` evenly spaced clips, offsets `int(k*avg + avg/2)` with
  `avg = (n - clip_len*interval + 1) / num_clips` (zeros when too short), wrapped.
* uniform (TSN / `frame_uniform`, SSv2 and Diving-48): `seg = (n-1)/T`, segment i spans
  `[round(seg*i), round(seg*(i+1))]` (round half to even, as numpy); training takes a random
  frame in the segment (inclusive), test its middle `(start+end)//2`.

Randomness is stateless (a per-example seed), so a clip depends only on the seed and its
position in the stream: re-runs and resumed runs sample the same frames.
"""

import tensorflow as tf


def _uniform01(seed, shape):
  return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float64)


def dense_train_indices(num_frames, clip_len: int, interval: int, seed) -> tf.Tensor:
  """(clip_len,) int32 frame indices of one randomly placed dense clip."""
  n = tf.cast(num_frames, tf.int32)
  span = n - clip_len * interval + 1  # number of valid offsets
  u = _uniform01(seed, [])
  offset = tf.where(span > 0, tf.cast(tf.floor(u * tf.cast(span, tf.float64)), tf.int32), 0)
  offset = tf.minimum(offset, tf.maximum(span - 1, 0))  # guards u*span rounding to span
  idx = offset + tf.range(clip_len, dtype=tf.int32) * interval
  return tf.math.floormod(idx, n)


def dense_test_indices(num_frames, clip_len: int, interval: int, num_clips: int) -> tf.Tensor:
  """(num_clips, clip_len) int32 indices of evenly spaced clips (official test clips)."""
  n = tf.cast(num_frames, tf.int32)
  ori = clip_len * interval
  avg = tf.cast(n - ori + 1, tf.float64) / float(num_clips)
  base = tf.range(num_clips, dtype=tf.float64) * avg
  offsets = tf.where(n > ori - 1, tf.cast(base + avg / 2.0, tf.int32),
                     tf.zeros([num_clips], tf.int32))  # float->int truncates, as astype(int)
  idx = offsets[:, None] + tf.range(clip_len, dtype=tf.int32)[None, :] * interval
  return tf.math.floormod(idx, n)


def _segments(num_frames, clip_len: int):
  seg = tf.cast(num_frames - 1, tf.float64) / float(clip_len)
  i = tf.range(clip_len, dtype=tf.float64)
  start = tf.cast(tf.math.round(seg * i), tf.int32)  # tf.math.round: half to even, as np.round
  end = tf.cast(tf.math.round(seg * (i + 1.0)), tf.int32)
  return start, end


def uniform_train_indices(num_frames, clip_len: int, seed) -> tf.Tensor:
  """(clip_len,) int32: a random frame in each of `clip_len` segments (ends inclusive)."""
  start, end = _segments(num_frames, clip_len)
  width = tf.cast(end - start + 1, tf.float64)
  u = _uniform01(seed, [clip_len])
  pick = tf.minimum(tf.cast(tf.floor(u * width), tf.int32), end - start)
  return start + pick


def uniform_test_indices(num_frames, clip_len: int, num_clips: int = 1) -> tf.Tensor:
  """(num_clips, clip_len) int32: segment middles `(start+end)//2` for one clip.

  With several clips, clip j takes `start + (end-start)*(2j+1)//(2*num_clips)` in every
  segment (evenly spread inside the segment; equals the official middle for one clip).
  """
  start, end = _segments(num_frames, clip_len)
  j = tf.range(num_clips, dtype=tf.int32)[:, None]
  return start[None, :] + ((end - start)[None, :] * (2 * j + 1)) // (2 * num_clips)


def train_indices(num_frames, *, sampling: str, clip_len: int, interval: int, seed) -> tf.Tensor:
  if sampling == 'dense':
    return dense_train_indices(num_frames, clip_len, interval, seed)
  if sampling == 'uniform':
    return uniform_train_indices(num_frames, clip_len, seed)
  raise ValueError(f"data.sampling must be 'dense' or 'uniform', got {sampling!r}")


def eval_indices(num_frames, *, sampling: str, clip_len: int, interval: int,
                 num_clips: int) -> tf.Tensor:
  if sampling == 'dense':
    return dense_test_indices(num_frames, clip_len, interval, num_clips)
  if sampling == 'uniform':
    return uniform_test_indices(num_frames, clip_len, num_clips)
  raise ValueError(f"data.sampling must be 'dense' or 'uniform', got {sampling!r}")
