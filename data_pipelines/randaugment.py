"""imgaug 0.4.0 `RandAugment(n, m)` for video: one draw per clip, the same ops on every frame.

The SSv2 recipe (docs/official_recipe.md#augmentations) runs `iaa.RandAugment(n=4, m=7)`
through mmaction2's
`Imgaug` wrapper, which calls `to_deterministic()` once per clip, so every frame of a clip
gets the same flip, crop, ops, order, signs and positions. imgaug's augmenter is:

1. always: horizontal flip with probability 0.5, then crop `round(U(0, m) * side / 224)`
   pixels from each side independently and resize back (bilinear);
2. then `SomeOf(n, ops, random_order=True)`: n *distinct* ops out of the 18 in `OPS`,
   applied in random order, with magnitudes from m (0..30 scale) as in `magnitudes`.

docs/data_pipeline.md has the op table (op, formula, value at m=7, imgaug's parameter).

Speed (benchmarks/pipeline_benchmark.py `train_ra`): the ops run on the 224x224
uint8-valued clip in float32 (integer values, rounded after the crop resize as imgaug's
uint8 frames are); the initial crop is folded into the random-resized-crop window
(`crop_window`, one resize per clip); the five affine ops use PIL's nearest-neighbour
sampling, so each is an integer index map (precomputed with numpy when the graph is built)
and one row gather per clip; colour ops are a few elementwise ops each, with PIL's
truncating arithmetic. Most ops run as one XLA computation, where those elementwise chains
become one pass over the clip (`apply_op`, `XLA_OPS`); `apply_op(..., xla=False)` gives the
same values with TF ops only.
"""

import os
from typing import Callable, Dict, NamedTuple

import numpy as np
import tensorflow as tf

from data_pipelines import ops

OPS = ('identity', 'autocontrast', 'equalize', 'invert', 'rotate', 'posterize', 'solarize',
       'color', 'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x',
       'translate_y', 'cutout', 'blur', 'smooth')
GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
M_MAX = 30.0
FILL = 128.0  # imgaug RandAugment's cval for affine fill and cutout


def magnitudes(m: float) -> Dict[str, float]:
  """imgaug's per-op parameters at magnitude m (before the random sign where there is one)."""
  m = float(m)
  return {
      'rotate_deg': m * 30.0 / M_MAX,
      'posterize_bits': 8 - min(max(int(m * 6.0 / M_MAX), 0), 6),
      'solarize_threshold': min(max(256 - int(m * 256.0 / M_MAX), 0), 256),
      'enhance': m * 0.9 / M_MAX,  # factor clip(1 +- this, 0.1, 1.9)
      'shear_deg': m * float(np.rad2deg(0.3)) / M_MAX,
      'translate_frac': m * 0.33 / M_MAX,
      'cutout_frac': min(max(m * (20.0 / 32.0) / M_MAX, 0.0), 20.0 / 32.0),
      'crop_max_px224': m,  # per side, in pixels of a 224 image
  }


# ------------------------------------------------------------------ affine (PIL nearest)


def affine_matrix(op: str, sign: float, height: int, width: int, m: float) -> np.ndarray:
  """The 2x3 output->input matrix imgaug's `pillike.warp_affine` hands to PIL (float32)."""
  mag = magnitudes(m)
  rot = sh_x = sh_y = tx = ty = 0.0
  center = (0.0, 0.0)
  if op == 'rotate':
    rot, center = sign * mag['rotate_deg'], (0.5, 0.5)
  elif op == 'shear_x':
    sh_x = sign * mag['shear_deg']
  elif op == 'shear_y':
    sh_y = sign * mag['shear_deg']
  elif op == 'translate_x':
    tx = sign * mag['translate_frac'] * width
  elif op == 'translate_y':
    ty = sign * mag['translate_frac'] * height
  else:
    raise ValueError(f'not an affine op: {op!r}')
  cx, cy = width * center[0], height * center[1]
  r, shx, shy = np.deg2rad([-rot, sh_x, sh_y])
  f32 = lambda a: np.array(a, np.float32)
  mats = [
      f32([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]]),
      f32([[np.cos(r), np.sin(r), 0], [-np.sin(r), np.cos(r), 0], [0, 0, 1]]),
      f32([[1, np.tanh(shx), 0], [np.tanh(shy), 1, 0], [0, 0, 1]]),  # imgaug uses tanh
      f32(np.eye(3)),  # scale 1
      f32([[1, 0, tx], [0, 1, ty], [0, 0, 1]]),
      f32([[1, 0, cx], [0, 1, cy], [0, 0, 1]]),
  ]
  fwd = f32(np.eye(3))
  for mat in mats:
    fwd = np.matmul(mat, fwd)
  return np.linalg.inv(fwd)[:2].astype(np.float32)


def nearest_index_map(matrix: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL `Image.transform(AFFINE, NEAREST)`: flat source index per output pixel, h*w = fill.

  PIL samples output pixel (x, y) at matrix @ (x + 0.5, y + 0.5, 1) and takes the pixel
  `int(v)` (-1 for negative v), filling what falls outside.
  """
  a = matrix.astype(np.float64)
  y, x = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing='ij')
  u = a[0, 0] * x + a[0, 1] * y + a[0, 2]
  v = a[1, 0] * x + a[1, 1] * y + a[1, 2]
  ui = np.where(u < 0, -1, np.floor(u)).astype(np.int64)
  vi = np.where(v < 0, -1, np.floor(v)).astype(np.int64)
  inside = (ui >= 0) & (ui < width) & (vi >= 0) & (vi < height)
  return np.where(inside, vi * width + ui, height * width).reshape(-1).astype(np.int32)


def _index_maps(height: int, width: int, m: float) -> np.ndarray:
  """(len(GEOMETRIC) * 2, h*w) maps: row 2*k + (sign > 0) for GEOMETRIC[k]."""
  rows = []
  for op in GEOMETRIC:
    for sign in (-1.0, 1.0):
      rows.append(nearest_index_map(affine_matrix(op, sign, height, width, m), height, width))
  return np.stack(rows)


def translation_shift(op: str, sign: float, height: int, width: int, m: float) -> int:
  """Whole-pixel shift that PIL's nearest sampling makes of a translation (out[i] = in[i - k])."""
  index = nearest_index_map(affine_matrix(op, sign, height, width, m), height, width)
  index = index.reshape(height, width)
  if op == 'translate_x':
    src, i = index[height // 2, width // 2], width // 2
    return int(i - src % width) if src < height * width else (width if sign > 0 else -width)
  src, i = index[height // 2, width // 2], height // 2
  return int(i - src // width) if src < height * width else (height if sign > 0 else -height)


def _shift(x, k: int, axis: int):
  """out[i] = x[i - k] along `axis` (1 rows, 2 columns), FILL where that is outside."""
  n = x.shape[axis]
  k = max(min(k, n), -n)
  pad = [[0, 0]] * 4
  pad[axis] = [k, 0] if k >= 0 else [0, -k]
  padded = tf.pad(x, pad, constant_values=FILL)
  start = [0, 0, 0, 0]
  start[axis] = 0 if k >= 0 else -k
  size = list(x.shape)
  return tf.slice(padded, start, size)


def _gather_pixels(x, index):
  """x (T, H, W, 3), index (H*W,) flat source pixel or H*W for the fill colour.

  Each frame gets its fill pixel appended (frame t's pixels and fill at t*(H*W+1) + 0..H*W),
  and one `gather_nd` of 3-value rows over all frames takes the pixels: ~10 % less than
  `gather(axis=1)` here.
  """
  t, h, w, c = x.shape
  n = h * w
  flat = tf.concat([tf.reshape(x, [t, n, c]), tf.fill([t, 1, c], tf.constant(FILL, x.dtype))],
                   axis=1)
  idx = index[None, :] + tf.range(0, t * (n + 1), n + 1)[:, None]
  return tf.reshape(tf.gather_nd(tf.reshape(flat, [-1, c]), tf.reshape(idx, [-1, 1])),
                    [t, h, w, c])


# ------------------------------------------------------------------ colour ops (PIL arithmetic)


def _blend(degenerate, x, factor, xla: bool = False):
  """PIL `Image.blend(degenerate, x, factor)` on uint8: float32 `d + f*(x-d)`, truncated.

  `factor` is a float, or a float32 tensor in [0.1, 1.9] (the drawn one of an enhance op's
  two factors): then the result is always clipped to 0..255, which changes nothing for a
  factor in [0, 1], where a float factor gets no clip (the result lies between d and x).

  `xla`: the blend is compiled by XLA, whose CPU backend contracts a multiply feeding an add
  into one fused multiply-add (one rounding instead of two, a level off now and then). A
  clamp of the product to a range it never leaves sits between the two and keeps them
  apart, so both paths round the product first, as PIL does.
  """
  product = factor * (x - degenerate)
  if xla:
    product = tf.clip_by_value(product, -512.0, 512.0)  # |f| <= 1.9, |x - d| <= 255
  out = degenerate + product
  if not isinstance(factor, float) or factor < 0 or factor > 1:
    out = tf.clip_by_value(out, 0.0, 255.0)
  return tf.floor(out)


def _enhance_factors(m: float):
  """imgaug's enhance factors at magnitude m: (for sign > 0, for sign < 0)."""
  enhance = magnitudes(m)['enhance']
  return min(1.0 + enhance, 1.9), max(1.0 - enhance, 0.1)


def _scale(x, factor: float):
  """`_blend(0, x, factor)`, PIL's brightness: 0 + f*(x - 0) is f*x exactly, >= 0."""
  out = x * factor
  return tf.floor(tf.minimum(out, 255.0) if factor > 1 else out)


# PIL's RGB -> L weights / 2**16: 16-bit binary fractions, exact in float32
_LUMA = np.array([19595.0, 38470.0, 7471.0], np.float32) / 65536.0


def luminance(x, channels: int = 1, bgr=None):
  """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 2**15) >> 16, repeated over `channels`
  output channels: floor(conv(x, w / 2**16) + 0.5), a 1x1 convolution with a bias (one
  fused oneDNN call, no broadcasting over the last axis) and a floor.

  Exact in float32: each weight / 2**16 is a 16-bit binary fraction, so every product and
  partial sum of uint8 values is a multiple of 2**-16 below 256, which float32's 24-bit
  mantissa holds exactly, in any summation order. With `bgr` true (`ops.flip_bgr`) the
  channels are B, G, R and the weights are taken in that order.
  """
  w = ops.in_channel_order(_LUMA, bgr)
  k = tf.tile(tf.reshape(w, [1, 1, 3, 1]), [1, 1, 1, channels])
  return tf.floor(tf.nn.bias_add(tf.nn.conv2d(x, k, 1, 'VALID'), tf.fill([channels], 0.5)))


def _luminance_xla(x, channels: int = 1, bgr=None):
  """`luminance` as elementwise products and sums, for XLA to fuse into its consumer (its
  convolution has no such fusion). The same exact values: every term is a multiple of
  2**-16 below 256, so no sum rounds, fused multiply-adds included."""
  w = ops.in_channel_order(_LUMA, bgr)
  lum = tf.floor(x[..., 0:1] * w[0] + x[..., 1:2] * w[1] + x[..., 2:3] * w[2] + 0.5)
  return lum if channels == 1 else tf.broadcast_to(lum, tf.concat([tf.shape(lum)[:-1],
                                                                   [channels]], 0))


def _filter_sums(x, kernel: np.ndarray, divisor: float):
  """The interior of PIL's `ImageFilter.Kernel`, before rounding: a VALID depthwise
  convolution with the kernel / divisor -> (T, H - 2b, W - 2b, 3), b = size // 2."""
  if kernel.min() < 0 or kernel.sum() != divisor:
    raise ValueError('_filter skips the clip: the kernel must be non-negative and normalised')
  k = tf.constant(np.tile(kernel[:, :, None, None].astype(np.float32), [1, 1, 3, 1]) / divisor)
  return tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], 'VALID')


def _with_border(x, sums, xla: bool = False):
  """The filtered clip: the interior `sums` rounded, the border of x kept. `xla`: as a
  padding and a select, which XLA fuses into one pass (TF runs the two concats as copies)."""
  b = (x.shape[1] - sums.shape[1]) // 2
  inner = tf.floor(sums + 0.5)
  if not xla:
    mid = tf.concat([x[:, b:-b, :b], inner, x[:, b:-b, -b:]], axis=2)
    return tf.concat([x[:, :b], mid, x[:, -b:]], axis=1)
  h, w = x.shape[1], x.shape[2]
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = (rows >= b) & (rows < h - b) & (cols >= b) & (cols < w - b)
  return tf.where(inside[None], tf.pad(inner, [[0, 0], [b, b], [b, b], [0, 0]]), x)


def _filter(x, kernel: np.ndarray, divisor: float):
  """PIL `ImageFilter.Kernel` on uint8: border of size//2 kept, interior rounded (and
  clipped, which these kernels never need: their weights are >= 0 and sum to `divisor`,
  so the weighted mean of values in 0..255 stays in 0..255)."""
  return _with_border(x, _filter_sums(x, kernel, divisor))


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
_BLUR = np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1],
                  [1, 1, 1, 1, 1]])


def smooth(x):
  return _filter(x, _SMOOTH, 13.0)


def blur(x):
  return _filter(x, _BLUR, 16.0)


def _rows(x):
  """(T, H, W, C) -> (T, H, W*C): each frame's rows as one contiguous axis, so per-channel
  work runs along long contiguous rows (TF's broadcasting and reductions over a last axis
  of 3 run several times slower on CPU)."""
  t, h, w, c = x.shape
  return tf.reshape(x, [t, h, w * c])


def _per_channel_affine(x, scale, offset):
  """x * scale + offset with (T, 3) scale/offset, broadcast along each frame's rows."""
  w = x.shape[2]
  s = tf.tile(scale, [1, w])[:, None, :]  # (T, 1, W*3): r, g, b, r, g, b, ...
  o = tf.tile(offset, [1, w])[:, None, :]
  return tf.reshape(_rows(x) * s + o, tf.shape(x))


def _channel_min_max(x):
  """Per frame and channel min and max -> two (T, 3): reduced over rows first (long
  contiguous rows), then over the W pixels of the (T, W*3) result."""
  t, _, w, c = x.shape
  rows = _rows(x)
  lo = tf.reduce_min(tf.reshape(tf.reduce_min(rows, axis=1), [t, w, c]), axis=1)
  hi = tf.reduce_max(tf.reshape(tf.reduce_max(rows, axis=1), [t, w, c]), axis=1)
  return lo, hi


def autocontrast(x):
  """imgaug `_autocontrast_no_pil` (cutoff 0) per frame and channel: lo/hi = the channel's
  min/max, v -> floor(255 (v - lo) / (hi - lo)); unchanged if hi <= lo.

  Computed as v*s + o + 1e-3 with s = 255/(hi-lo): the exact quotient is either an integer
  or at least 1/255 from one, and float32 is off by < 1e-4 here, so the floor is the exact
  quotient's. imgaug's float64 table can be one lower where the exact value is an integer.
  No clip: every value lies in its own channel's [lo, hi], so v*s + o is in
  [1e-3 - 1e-5, 255 + 1e-3 + 1e-4] and its floor in 0..255.
  """
  lo, hi = _channel_min_max(x)  # (T, 3)
  spread = hi > lo
  scale = tf.where(spread, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(spread, -lo * scale, 0.0) + 1e-3
  return tf.floor(_per_channel_affine(x, scale, offset))


def equalize(x):
  """imgaug `_equalize_no_pil_` (what it uses at 224x224) per frame and channel.

  step = (count of pixels below 255) // 255; lut[v] = (step//2 + cumsum(hist)[v-1]) // step,
  clipped to 255; identity when one value only or step is 0.
  """
  t, _, w, _ = x.shape
  # bin id (frame*3 + channel)*256 + v, one add along each frame's rows (T, 1, W*3)
  base = np.arange(t, dtype=np.float32)[:, None] * 768.0 + np.array([0.0, 256.0, 512.0],
                                                                     np.float32)
  ids = tf.cast(_rows(x) + tf.constant(np.tile(base, [1, w])[:, None, :]), tf.int32)
  hist = tf.reshape(tf.math.bincount(tf.reshape(ids, [-1]), minlength=t * 3 * 256,
                                     maxlength=t * 3 * 256), [t * 3, 256])
  step = tf.reduce_sum(hist[:, :-1], axis=1, keepdims=True) // 255
  nonzero = tf.reduce_sum(tf.cast(hist > 0, tf.int32), axis=1, keepdims=True)
  cum = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((step // 2 + cum) // tf.maximum(step, 1), 255)
  ident = tf.logical_or(nonzero <= 1, step == 0)
  lut = tf.where(ident, tf.range(256)[None], lut)
  # gather_nd with one index per value: TF's scalar-slice `gather` costs ~2.5x as much here
  lut = tf.reshape(tf.cast(lut, tf.float32), [-1])
  return tf.reshape(tf.gather_nd(lut, ids[..., None]), x.shape)


def contrast(x, factor: float, bgr=None, xla: bool = False):
  """PIL ImageEnhance.Contrast: blend with the frame's mean luminance int(mean + 0.5).

  The rounded mean is integer arithmetic on the luminance sum S over n pixels:
  (2S + n) // 2n, exact at any frame size and the same in both paths (a float mean can
  round across the .5 where 1/n nears float32's resolution)."""
  lum = (_luminance_xla if xla else luminance)(x, bgr=bgr)
  n = int(x.shape[1]) * int(x.shape[2])
  total = tf.reduce_sum(tf.cast(lum, tf.int32), axis=[1, 2, 3], keepdims=True)
  mean = tf.cast((2 * total + n) // (2 * n), tf.float32)
  return _blend(mean, x, factor, xla)


def cutout_box(u, height: int, width: int, m: float):
  """imgaug Cutout (squared, position uniform) box (y1, y2, x1, x2) from u = (pos_x, pos_y)."""
  size = magnitudes(m)['cutout_frac']
  y1 = (u[1] - size / 2) * height
  y2 = (u[1] + size / 2) * height
  half = (y2 - y1) / 2
  xc = u[0] * width
  x1, x2 = xc - half, xc + half
  clip = lambda v, hi: tf.clip_by_value(tf.cast(v, tf.int32), 0, hi)  # int() then clamp
  return clip(y1, height), clip(y2, height), clip(x1, width), clip(x2, width)


def cutout(x, u, m: float):
  shape = x.shape
  y1, y2, x1, x2 = cutout_box(u, shape[1], shape[2], m)
  rows = tf.range(shape[1])[:, None, None]
  cols = tf.range(shape[2])[None, :, None]
  box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  mask = tf.cast(tf.broadcast_to(box, [shape[1], shape[2], 3]), tf.float32)[None]
  return x * (1.0 - mask) + FILL * mask  # (1, H, W, 3) factors: exact, two passes over x


# ------------------------------------------------------------------ the augmenter


# The ops XLA runs faster than TF's kernels do: their chains of elementwise ops become one
# loop over the clip, and the pixel gathers are vectorised. Equalize (a histogram and a
# per-value lookup) stays with TF's kernels; the filters convolve with TF's kernel (which
# XLA's CPU backend runs several times slower) but finish in XLA (`_xla_computations`).
# Identity stays outside too: as an XLA computation it would copy the clip.
_TF_ONLY = ('identity', 'equalize', 'sharpness', 'blur', 'smooth')
XLA_OPS = tuple(name for name in OPS if name not in _TF_ONLY)


def _branches(x, sign, m: float, cutout_u, maps, bgr, xla: bool):
  """Op name -> a function of no arguments computing it on x (see `apply_op`)."""
  h, w = x.shape[1], x.shape[2]
  mag = magnitudes(m)
  hi_f, lo_f = _enhance_factors(m)
  bits = mag['posterize_bits']
  q = float(2 ** (8 - bits))
  lum = _luminance_xla if xla else luminance

  def enhance(fn):
    return lambda: tf.cond(sign > 0, lambda: fn(hi_f), lambda: fn(lo_f))

  def geometric(k):
    return lambda: _gather_pixels(x, maps[2 * k + tf.cast(sign > 0, tf.int32)])

  branches = {
      'identity': lambda: x,
      'autocontrast': lambda: autocontrast(x),
      'equalize': lambda: equalize(x),
      'invert': lambda: 255.0 - x,
      'posterize': lambda: tf.floor(x * (1.0 / q)) * q,
      # |255 - x| above the threshold, |0 - x| below it
      'solarize': lambda: tf.abs(tf.cast(x >= mag['solarize_threshold'], tf.float32) * 255.0 - x),
      'color': enhance(lambda f: _blend(lum(x, 3, bgr), x, f, xla)),
      'contrast': enhance(lambda f: contrast(x, f, bgr, xla)),
      'brightness': enhance(lambda f: _scale(x, f)),
      'sharpness': enhance(lambda f: _blend(smooth(x), x, f, xla)),
      'cutout': lambda: cutout(x, cutout_u, m),
      'blur': lambda: blur(x),
      'smooth': lambda: smooth(x),
  }
  for k, name in enumerate(GEOMETRIC):
    branches[name] = geometric(k)
  for name, axis in (('translate_x', 2), ('translate_y', 1)):  # a pure shift: pad and slice
    pos, neg = (translation_shift(name, sg, h, w, m) for sg in (1.0, -1.0))
    branches[name] = (lambda p, n, a: lambda: tf.cond(sign > 0, lambda: _shift(x, p, a),
                                                      lambda: _shift(x, n, a)))(pos, neg, axis)
  return branches


_TF_XLA_STARTED = False


def _start_tf_xla():
  """Makes TF's first XLA compilation with XLA_FLAGS unset.

  TF's XLA reads XLA_FLAGS once, at its first compilation, and aborts the process on a flag
  it does not know. The variable is usually there for JAX, whose XLA is another version with
  other flags (a GPU flag newer than TensorFlow's XLA would stop a training run at its first
  RandAugment clip). Called where the pipeline is built (the compilation is lifted out of any
  graph being traced); JAX reads the variable as it was.
  """
  global _TF_XLA_STARTED
  if _TF_XLA_STARTED:
    return
  saved = os.environ.pop('XLA_FLAGS', None)
  try:
    with tf.init_scope(), tf.device('/CPU:0'):
      tf.function(lambda v: v + 1.0, jit_compile=True)(tf.zeros([1]))
  finally:
    if saved is not None:
      os.environ['XLA_FLAGS'] = saved
  _TF_XLA_STARTED = True


class _XlaComputations(NamedTuple):
  """The XLA computations of `apply_op` at one magnitude (each traced and compiled once per
  clip shape)."""
  ops: Callable        # (x, index into XLA_OPS, sign, cutout_u, maps, bgr) -> x
  border: Callable     # (x, filter sums) -> the filtered clip (smooth, blur)
  sharpen: Callable    # (x, smooth's sums, sign) -> sharpness


_XLA_COMPUTATIONS: Dict[float, _XlaComputations] = {}


def _xla_computations(m: float) -> _XlaComputations:
  """`_XlaComputations` at magnitude m, made once per magnitude."""
  _start_tf_xla()
  m = float(m)
  if m not in _XLA_COMPUTATIONS:
    hi_f, lo_f = _enhance_factors(m)

    def run_ops(x, k, sign, cutout_u, maps, bgr):
      branches = _branches(x, sign, m, cutout_u, maps, bgr, xla=True)
      return tf.switch_case(k, [branches[name] for name in XLA_OPS])

    def sharpen(x, sums, sign):
      # the drawn factor as a tensor, not a conditional: XLA fuses the op into one loop
      return _blend(_with_border(x, sums, xla=True), x, tf.where(sign > 0, hi_f, lo_f),
                    xla=True)

    _XLA_COMPUTATIONS[m] = _XlaComputations(
        ops=tf.function(run_ops, jit_compile=True),
        border=tf.function(lambda x, sums: _with_border(x, sums, xla=True), jit_compile=True),
        sharpen=tf.function(sharpen, jit_compile=True))
  return _XLA_COMPUTATIONS[m]


def apply_op(x, op: int, sign, m: float, cutout_u=None, maps=None, bgr=None, xla: bool = True):
  """Op number `op` (index into OPS) with `sign` in {-1, 1} at magnitude m on a (T, H, W, 3)
  float32 clip of uint8 values (static H, W); `bgr`: its channels are B, G, R (only the
  luminance of color and contrast depends on the order).

  With `xla`, the XLA_OPS run as one XLA computation, the filters end in one
  (`_xla_computations`), and the rest are TF ops; without, every op runs as TF ops. Both
  give the same values, bit for bit.
  """
  h, w = x.shape[1], x.shape[2]
  if maps is None:
    maps = tf.constant(_index_maps(h, w, m))
  if cutout_u is None:
    cutout_u = tf.constant([0.5, 0.5])
  if bgr is None:
    bgr = tf.constant(False)
  sign = tf.cast(sign, tf.float32)
  branches = _branches(x, sign, m, cutout_u, maps, bgr, xla=False)
  if xla:
    fn = _xla_computations(m)
    local = tf.constant([XLA_OPS.index(n) if n in XLA_OPS else 0 for n in OPS], tf.int32)
    k = tf.gather(local, tf.cast(op, tf.int32))
    run_ops = lambda: fn.ops(x, k, sign, cutout_u, maps, tf.convert_to_tensor(bgr, tf.bool))
    branches.update({name: run_ops for name in XLA_OPS})
    branches['smooth'] = lambda: fn.border(x, _filter_sums(x, _SMOOTH, 13.0))
    branches['blur'] = lambda: fn.border(x, _filter_sums(x, _BLUR, 16.0))
    branches['sharpness'] = lambda: fn.sharpen(x, _filter_sums(x, _SMOOTH, 13.0), sign)
  out = tf.switch_case(tf.cast(op, tf.int32), [branches[name] for name in OPS])
  return tf.ensure_shape(out, x.shape)


def draw(seed, num_ops: int, magnitude: float):
  """One clip's draws: flip, crop sides (px of a 224 image: top, right, bottom, left), ops in
  order, signs, cutout position."""
  seeds = tf.random.experimental.stateless_split(seed, 5)
  flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
  crop = tf.random.stateless_uniform([4], seeds[1], 0.0, float(magnitude), dtype=tf.float64)
  n = min(int(num_ops), len(OPS))
  order = tf.argsort(tf.random.stateless_uniform([len(OPS)], seeds[2]))[:n]
  signs = tf.where(tf.random.stateless_uniform([n], seeds[3]) < 0.5, -1.0, 1.0)
  cutout_u = tf.random.stateless_uniform([2], seeds[4])
  return flip, crop, order, signs, cutout_u


def crop_window(top, left, height, width, crop_px224, size: int):
  """Folds imgaug's initial crop (pixels of the `size` output per side, drawn as
  round(U(0, m) * size / 224)) into a source window (top, left, height, width) that is
  resized to `size`: the window shrinks by the same fractions, rounded to whole pixels."""
  px = tf.math.round(crop_px224 * (size / 224.0))  # np.round: half to even, as tf.round
  frac = px / float(size)  # top, right, bottom, left
  hf, wf = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  ct = tf.cast(tf.math.round(frac[0] * hf), tf.int32)
  cb = tf.cast(tf.math.round(frac[2] * hf), tf.int32)
  cl = tf.cast(tf.math.round(frac[3] * wf), tf.int32)
  cr = tf.cast(tf.math.round(frac[1] * wf), tf.int32)
  new_h = tf.maximum(height - ct - cb, 1)
  new_w = tf.maximum(width - cl - cr, 1)
  return top + ct, left + cl, new_h, new_w


def randaugment_ops(x, flip, order, signs, cutout_u, magnitude: float):
  """The main stage on a (T, H, W, 3) float32 clip of uint8 values (static shape): optional
  flip, then the drawn ops in order -> (float32 of uint8 values, bgr).

  The flip is `ops.flip_bgr`'s: where it flips, the channels come out as B, G, R (`bgr`
  true) for `ops.normalize(..., bgr=bgr)` to put back. Every op but the luminance of color
  and contrast treats the channels alike, and those two take the order.
  """
  if None in x.shape:
    raise ValueError(f'randaugment needs a static clip shape, got {x.shape}')
  x, bgr = ops.flip_bgr(x, flip)
  maps = tf.constant(_index_maps(x.shape[1], x.shape[2], magnitude))
  for i in range(order.shape[0]):
    x = apply_op(x, order[i], signs[i], magnitude, cutout_u=cutout_u, maps=maps, bgr=bgr)
  return x, bgr


def randaugment(video: tf.Tensor, num_ops: int, magnitude: float, seed) -> tf.Tensor:
  """imgaug RandAugment(n, m) on a whole (T, H, W, 3) clip, one draw for all frames.

  The initial crop is applied here as imgaug does it (crop, bilinear resize back); the
  training pipeline folds it into its crop window instead (`crop_window`).
  """
  x = tf.clip_by_value(tf.round(tf.cast(video, tf.float32)), 0.0, 255.0)
  if num_ops <= 0:
    return x
  flip, crop, order, signs, cutout_u = draw(seed, num_ops, magnitude)
  h, w = x.shape[1], x.shape[2]
  px = tf.cast(tf.math.round(crop * (h / 224.0)), tf.int32)
  pw = tf.cast(tf.math.round(crop * (w / 224.0)), tf.int32)
  x = tf.cond(flip, lambda: tf.reverse(x, axis=[2]), lambda: x)
  cropped = x[:, px[0]:h - px[2], pw[3]:w - pw[1]]
  x = tf.round(tf.image.resize(cropped, [h, w], method='bilinear'))
  x = tf.ensure_shape(x, [None, h, w, 3])
  return randaugment_ops(x, tf.constant(False), order, signs, cutout_u, magnitude)[0]
