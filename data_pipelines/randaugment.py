"""RandAugment for video: n ops of magnitude m drawn once per clip, applied to every frame.

The SSv2 recipe uses imgaug `RandAugment(n=4, m=7)` on whole clips
(docs/official_recipe.md#augmentations); imgaug
draws the ops once (`to_deterministic`) so all frames get the same ones. The op set is
imgaug's: identity, autocontrast, equalize, rotate, solarize, color, posterize, contrast,
brightness, sharpness, shear x/y, translate x/y; m is on imgaug's 0..30 scale. Magnitude
maps follow the common RandAugment table (rotate 30°, shear 0.3, translate 45 %, enhance
factors 1 ± 0.9, posterize 8 -> 4 bits, solarize threshold 256 -> 0) at m = 30. Works on
float32 (T, H, W, 3) in 0..255; affine fills with grey 128.
"""

import math

import tensorflow as tf

OPS = ('identity', 'autocontrast', 'equalize', 'rotate', 'solarize', 'color', 'posterize',
       'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
_MAX_M = 30.0


def _gray(x):
  return tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def _blend(degenerate, x, factor):
  return degenerate + factor * (x - degenerate)


def _affine(x, a0, a1, a2, b0, b1, b2):
  """Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
  shape = tf.shape(x)
  t = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])
  t = tf.tile(tf.cast(t, tf.float32)[None], [shape[0], 1])
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=t, output_shape=shape[1:3], interpolation='BILINEAR',
      fill_mode='CONSTANT', fill_value=128.0)


def _autocontrast(x):
  lo = tf.reduce_min(x, axis=[1, 2], keepdims=True)
  hi = tf.reduce_max(x, axis=[1, 2], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-3), 1.0)
  return tf.where(hi > lo, (x - lo) * scale, x)


def _equalize(x):
  """Histogram equalisation per frame and channel (vectorised over the clip)."""
  shape = tf.shape(x)
  t = shape[0]
  v = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.int32)  # (T, H, W, 3)
  ids = (tf.range(t)[:, None, None, None] * 3 + tf.range(3)[None, None, None, :]) * 256 + v
  hist = tf.reshape(tf.math.bincount(tf.reshape(ids, [-1]), minlength=t * 3 * 256,
                                     maxlength=t * 3 * 256), [t * 3, 256])
  cdf = tf.cast(tf.cumsum(hist, axis=1), tf.float32)
  total = cdf[:, -1:]
  cdf_min = tf.reduce_min(tf.where(hist > 0, cdf, total), axis=1, keepdims=True)
  lut = tf.where(total > cdf_min, (cdf - cdf_min) / tf.maximum(total - cdf_min, 1.0) * 255.0,
                 tf.cast(tf.range(256), tf.float32)[None])  # flat channel: unchanged
  return tf.reshape(tf.gather(tf.reshape(lut, [-1]), tf.reshape(ids, [-1])), shape)


def _sharpness(x, factor):
  k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  blurred = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], 'SAME')
  # keep the border pixels, as PIL's ImageEnhance.Sharpness does
  h, w = tf.shape(x)[1], tf.shape(x)[2]
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inner = ((rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1))[None, :, :, None]
  return _blend(tf.where(inner, blurred, x), x, factor)


def apply_op(x: tf.Tensor, op, level, sign) -> tf.Tensor:
  """Applies op number `op` (index into OPS) at `level` in [0, 1] with `sign` in {-1, 1}."""
  h = tf.cast(tf.shape(x)[1], tf.float32)
  w = tf.cast(tf.shape(x)[2], tf.float32)
  enhance = 1.0 + sign * 0.9 * level

  def rotate():
    a = sign * level * 30.0 * math.pi / 180.0
    c, s = tf.cos(a), tf.sin(a)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _affine(x, c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)

  def posterize():
    shift = tf.cast(tf.round(level * 4.0), tf.float32)  # 0..4 bits dropped
    q = tf.pow(2.0, shift)
    return tf.floor(tf.round(x) / q) * q

  def contrast():
    mean = tf.reduce_mean(_gray(x), axis=[1, 2, 3], keepdims=True)
    return _blend(mean, x, enhance)

  branches = [
      lambda: x,
      lambda: _autocontrast(x),
      lambda: _equalize(x),
      rotate,
      lambda: tf.where(x < 256.0 - level * 256.0, x, 255.0 - x),
      lambda: _blend(_gray(x), x, enhance),
      posterize,
      contrast,
      lambda: x * enhance,
      lambda: _sharpness(x, enhance),
      lambda: _affine(x, 1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0),
      lambda: _affine(x, 1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0),
      lambda: _affine(x, 1.0, 0.0, -sign * level * 0.45 * w, 0.0, 1.0, 0.0),
      lambda: _affine(x, 1.0, 0.0, 0.0, 0.0, 1.0, -sign * level * 0.45 * h),
  ]
  out = tf.switch_case(tf.cast(op, tf.int32), branches)
  return tf.clip_by_value(tf.ensure_shape(out, x.shape), 0.0, 255.0)


def randaugment(video: tf.Tensor, num_ops: int, magnitude: float, seed) -> tf.Tensor:
  """n random ops (with replacement) at magnitude m, each drawn once for the whole clip."""
  x = tf.clip_by_value(tf.round(tf.cast(video, tf.float32)), 0.0, 255.0)  # uint8 values
  level = min(float(magnitude), _MAX_M) / _MAX_M
  seeds = tf.random.experimental.stateless_split(seed, 2)
  ops = tf.random.stateless_uniform([num_ops], seeds[0], 0, len(OPS), dtype=tf.int32)
  signs = tf.where(tf.random.stateless_uniform([num_ops], seeds[1]) < 0.5, -1.0, 1.0)
  for i in range(num_ops):
    x = apply_op(x, ops[i], level, signs[i])
  return x
