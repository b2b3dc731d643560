"""Video ops on whole clips: one random draw per clip, applied to every frame.

Geometry follows mmaction2 as the official AIM configs use it (docs/sampling.md#spatial):
`Resize(-1, S)` (short side S, sizes `int(x*scale + 0.5)`), `RandomResizedCrop` (10 attempts,
area and log-uniform ratio, `round(sqrt(...))` sides, centre-square fallback), `Resize(224,
224, keep_ratio=False)`, `Flip`, `CenterCrop` and `ThreeCrop` (left/top, right/bottom,
middle, with offsets `2*step` and `step`, `step = (long - crop)//2`). Frames are (T, H, W, 3).
"""

import math
from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

# ImageNet PCA lighting (mmaction2 ColorJitter, used by the K400 L/14 recipe).
_EIG_VAL = (55.46, 4.794, 1.148)
_EIG_VEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def short_side_size(height, width, short_side: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """mmcv `rescale_size` for `Resize(-1, short_side)`: `int(x*scale + 0.5)` on both sides."""
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  scale = float(short_side) / tf.minimum(h, w)
  return (tf.cast(tf.floor(h * scale + 0.5), tf.int32),
          tf.cast(tf.floor(w * scale + 0.5), tf.int32))


def resize(frames: tf.Tensor, height, width) -> tf.Tensor:
  """Bilinear resize of (T, H, W, 3) to (T, height, width, 3) float32 (no-op cast if same)."""
  shape = tf.shape(frames)
  same = tf.logical_and(tf.equal(shape[1], height), tf.equal(shape[2], width))
  return tf.cond(same, lambda: tf.cast(frames, tf.float32),
                 lambda: tf.image.resize(tf.cast(frames, tf.float32), tf.stack([height, width]),
                                         method='bilinear'))


def resize_short_side(frames: tf.Tensor, short_side: int) -> tf.Tensor:
  shape = tf.shape(frames)
  h, w = short_side_size(shape[1], shape[2], short_side)
  return resize(frames, h, w)


def random_resized_crop_box(height, width, seed, area_range: Sequence[float],
                            aspect_ratio_range: Sequence[float], max_attempts: int = 10):
  """mmaction2 `RandomResizedCrop.get_crop_bbox` with stateless draws -> (top, left, h, w)."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  h = tf.cast(height, tf.int32)
  w = tf.cast(width, tf.int32)
  area = tf.cast(h * w, tf.float64)
  lo, hi = float(aspect_ratio_range[0]), float(aspect_ratio_range[1])
  log_ratio = tf.random.stateless_uniform(
      [max_attempts], seeds[0], tf.math.log(tf.constant(lo, tf.float64)),
      tf.math.log(tf.constant(hi, tf.float64)), dtype=tf.float64)
  ratios = tf.exp(log_ratio)
  targets = tf.random.stateless_uniform([max_attempts], seeds[1], float(area_range[0]),
                                        float(area_range[1]), dtype=tf.float64) * area
  # np.round (half to even) then int32, as the official code does.
  cw = tf.cast(tf.math.round(tf.sqrt(targets * ratios)), tf.int32)
  ch = tf.cast(tf.math.round(tf.sqrt(targets / ratios)), tf.int32)
  ok = tf.logical_and(ch <= h, cw <= w)
  first = tf.cast(tf.argmax(tf.cast(ok, tf.int32)), tf.int32)
  any_ok = tf.reduce_any(ok)
  side = tf.minimum(h, w)
  crop_h = tf.where(any_ok, ch[first], side)
  crop_w = tf.where(any_ok, cw[first], side)
  # random.randint(0, img - crop) is inclusive at both ends.
  u = tf.random.stateless_uniform([2], seeds[2], dtype=tf.float64)
  top_r = tf.cast(tf.floor(u[0] * tf.cast(h - crop_h + 1, tf.float64)), tf.int32)
  left_r = tf.cast(tf.floor(u[1] * tf.cast(w - crop_w + 1, tf.float64)), tf.int32)
  top = tf.where(any_ok, tf.minimum(top_r, h - crop_h), (h - side) // 2)
  left = tf.where(any_ok, tf.minimum(left_r, w - crop_w), (w - side) // 2)
  return top, left, crop_h, crop_w


def decode_frames(encoded: tf.Tensor) -> tf.Tensor:
  """(N,) JPEG strings -> (N, H, W, 3) uint8."""
  return tf.map_fn(lambda x: tf.io.decode_jpeg(x, channels=3), encoded,
                   fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def decode_crop_resize(encoded: tf.Tensor, *, short_side: int, size: int, seed,
                       area_range, aspect_ratio_range, window_fn=None) -> tf.Tensor:
  """Training geometry: short-side resize, random resized crop, resize to (size, size).

  Only the crop window is decoded when the stored frames already have the short side the
  recipe resizes to (what `prepare` writes by default): `decode_and_crop_jpeg` then gives the
  same pixels as decode-then-crop for less work. Otherwise frames are decoded whole, resized
  and cropped. `window_fn(top, left, h, w)`, if given, adjusts the crop box before decoding
  (RandAugment folds its initial crop in there). Returns (T, size, size, 3) float32 in 0..255.
  """
  shape = tf.io.extract_jpeg_shape(encoded[0])
  rh, rw = short_side_size(shape[0], shape[1], short_side)
  top, left, ch, cw = random_resized_crop_box(rh, rw, seed, area_range, aspect_ratio_range)
  if window_fn is not None:
    top, left, ch, cw = window_fn(top, left, ch, cw)

  def crop_decode():
    window = tf.stack([top, left, ch, cw])
    crops = tf.map_fn(lambda x: tf.io.decode_and_crop_jpeg(x, window, channels=3), encoded,
                      fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    return tf.image.resize(tf.cast(crops, tf.float32), [size, size], method='bilinear')

  def full_decode():
    frames = resize(decode_frames(encoded), rh, rw)
    crops = frames[:, top:top + ch, left:left + cw, :]
    return tf.image.resize(crops, [size, size], method='bilinear')

  stored_ok = tf.logical_and(tf.equal(rh, shape[0]), tf.equal(rw, shape[1]))
  out = tf.cond(stored_ok, crop_decode, full_decode)
  return tf.ensure_shape(out, [None, size, size, 3])


def random_flip(frames: tf.Tensor, prob: float, seed) -> tf.Tensor:
  """Horizontal flip of the whole clip with probability `prob`."""
  if prob <= 0:
    return frames
  u = tf.random.stateless_uniform([], seed)
  return tf.cond(u < prob, lambda: tf.reverse(frames, axis=[2]), lambda: frames)


def flip_bgr(frames: tf.Tensor, flip) -> Tuple[tf.Tensor, tf.Tensor]:
  """Horizontal flip when `flip`, leaving the channels in reverse order: -> (frames, bgr).

  Reversing the (W, C) axes together moves each frame row as one contiguous run and costs
  ~1/3 of reversing W alone over 3-value pixels (1.8 against 4.7 ms for 8x224x224x3 float32
  on one core). The channel order is put back for free by `normalize(..., bgr=bgr)`, whose
  1x1 convolution then reads the channels in reverse; per-channel ops in between take `bgr`
  too (`pca_lighting`; RandAugment's luminance).
  """
  bgr = tf.convert_to_tensor(flip, tf.bool)
  return tf.cond(bgr, lambda: tf.reverse(frames, axis=[2, 3]), lambda: frames), bgr


def random_flip_bgr(frames: tf.Tensor, prob: float, seed) -> Tuple[tf.Tensor, tf.Tensor]:
  """`random_flip` (the same draw) through `flip_bgr`: -> (frames, bgr)."""
  if prob <= 0:
    return frames, tf.constant(False)
  return flip_bgr(frames, tf.random.stateless_uniform([], seed) < prob)


def in_channel_order(values, bgr) -> tf.Tensor:
  """Per-channel values ((3,) or (3, k), RGB) in the frames' channel order: reversed when
  `bgr` (a bool tensor from `flip_bgr`) is true; as given when `bgr` is None."""
  v = tf.convert_to_tensor(values, tf.float32)
  return v if bgr is None else tf.where(bgr, v[::-1], v)


def normalize(frames: tf.Tensor, mean: Sequence[float], std: Sequence[float],
              bgr=None) -> tf.Tensor:
  """(x - mean) / std per RGB channel, on 0..255 values, as x * (1/std) - mean/std.

  Written as a 1x1 convolution with a diagonal kernel: TF's broadcasting elementwise ops
  over a last axis of 3 ran ~5x slower than the oneDNN convolution here (benchmark.py).
  With `bgr` (a bool tensor, from `flip_bgr`) true the input channels are B, G, R: the
  kernel's input rows are reversed and the output is RGB. Exact either way: each output is
  one product plus products with zero weights.
  """
  inv = [1.0 / float(v) for v in std]
  offset = tf.constant([-float(m) * i for m, i in zip(mean, inv)], tf.float32)
  kernel = in_channel_order(np.diag(inv).astype(np.float32), bgr)[None, None]  # (1, 1, in 3, out 3)
  x = tf.cast(frames, tf.float32)
  shape = tf.shape(x)
  flat = tf.reshape(x, tf.concat([[-1], shape[-3:]], 0))  # (..., H, W, 3) -> (N, H, W, 3)
  out = tf.nn.bias_add(tf.nn.conv2d(flat, kernel, 1, 'VALID'), offset)
  return tf.reshape(out, shape)


def center_crop(frames: tf.Tensor, size: int) -> tf.Tensor:
  """mmaction2 CenterCrop: top=(h-size)//2, left=(w-size)//2."""
  shape = tf.shape(frames)
  top = (shape[1] - size) // 2
  left = (shape[2] - size) // 2
  return frames[:, top:top + size, left:left + size, :]


def three_crop(frames: tf.Tensor, size: int) -> tf.Tensor:
  """mmaction2 ThreeCrop along the long side -> (3, T, size, size, 3).

  Order left/top, right/bottom, middle; offsets 0, 2*step, step with step=(long-size)//2.
  The short side is centred when it is longer than `size` (official code asserts equality).
  """
  shape = tf.shape(frames)
  h, w = shape[1], shape[2]
  wide = w >= h
  step = tf.where(wide, (w - size) // 2, (h - size) // 2)
  centre = tf.where(wide, (h - size) // 2, (w - size) // 2)
  views = []
  for k in (0, 2, 1):
    along = step * k
    top = tf.where(wide, centre, along)
    left = tf.where(wide, along, centre)
    views.append(frames[:, top:top + size, left:left + size, :])
  return tf.stack(views, axis=0)


def pca_lighting(frames: tf.Tensor, alpha_std: float, seed, bgr=None) -> tf.Tensor:
  """mmaction2 ColorJitter (color_space_aug=False): add eigvec*alpha @ eigval, one draw per
  clip (to the channels in reverse order when `bgr`, see `flip_bgr`)."""
  if alpha_std <= 0:
    return frames
  alpha = tf.random.stateless_normal([3], seed, stddev=alpha_std)
  vec = tf.constant(_EIG_VEC, tf.float32)
  rgb = tf.linalg.matvec(vec * alpha[None, :], tf.constant(_EIG_VAL, tf.float32))
  return tf.cast(frames, tf.float32) + in_channel_order(rgb, bgr)


def erasing_box(height, width, seed, min_area: float = 0.02, max_area: float = 1 / 3,
                min_aspect: float = 0.3, max_attempts: int = 10):
  """timm 0.5.4 `RandomErasing._erase` box draws (count 1) -> (ok, top, left, h, w).

  Up to 10 attempts: area U(min_area, max_area) * H*W, aspect exp(U(log 0.3, log 1/0.3)),
  h = round(sqrt(area*aspect)), w = round(sqrt(area/aspect)) (half to even, as Python's
  round); the first attempt with h < H and w < W wins, at top U{0..H-h}, left U{0..W-w}.
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  h = tf.cast(height, tf.int32)
  w = tf.cast(width, tf.int32)
  area = tf.cast(h * w, tf.float64)
  targets = tf.random.stateless_uniform([max_attempts], seeds[0], min_area, max_area,
                                        dtype=tf.float64) * area
  log_r = tf.random.stateless_uniform([max_attempts], seeds[1], math.log(min_aspect),
                                      math.log(1.0 / min_aspect), dtype=tf.float64)
  ratio = tf.exp(log_r)
  eh = tf.cast(tf.math.round(tf.sqrt(targets * ratio)), tf.int32)
  ew = tf.cast(tf.math.round(tf.sqrt(targets / ratio)), tf.int32)
  ok = tf.logical_and(eh < h, ew < w)
  first = tf.cast(tf.argmax(tf.cast(ok, tf.int32)), tf.int32)
  bh, bw = eh[first], ew[first]
  u = tf.random.stateless_uniform([2], seeds[2], dtype=tf.float64)
  top = tf.minimum(tf.cast(tf.floor(u[0] * tf.cast(h - bh + 1, tf.float64)), tf.int32), h - bh)
  left = tf.minimum(tf.cast(tf.floor(u[1] * tf.cast(w - bw + 1, tf.float64)), tf.int32), w - bw)
  return tf.reduce_any(ok), top, left, bh, bw


def random_erasing(frames: tf.Tensor, prob: float, seed) -> tf.Tensor:
  """timm 0.5.4 `RandomErasing(probability=prob)` defaults, one box for the whole clip.

  The official recipe runs it per frame with the random state reset, so every frame gets the
  same box; mode 'const' fills it with 0 on the normalised frames (the mean colour). Applied
  when U(0,1) <= prob (timm returns early on `random() > probability`).
  """
  if prob <= 0:
    return frames
  seeds = tf.random.experimental.stateless_split(seed, 2)
  shape = tf.shape(frames)
  ok, top, left, bh, bw = erasing_box(shape[1], shape[2], seeds[1])
  apply = tf.logical_and(tf.random.stateless_uniform([], seeds[0]) <= prob, ok)
  rows = tf.range(shape[1])[:, None, None]
  cols = tf.range(shape[2])[None, :, None]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)

  def erase():
    keep = 1.0 - tf.cast(box, frames.dtype)  # (H, W, 1)
    keep = tf.broadcast_to(keep, tf.concat([shape[1:3], shape[3:]], 0))[None]  # (1, H, W, C)
    return frames * keep

  return tf.cond(apply, erase, lambda: tf.identity(frames))
