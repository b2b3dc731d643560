"""RandAugment op by op against imgaug 0.4.0's formulas (written out here in numpy; imgaug
itself needs numpy < 2) and, for the ops imgaug hands to PIL, against PIL itself."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from data_pipelines import randaugment as ra  # noqa: E402

M = 7


def textured(seed=0, t=2, h=224, w=224):
  """uint8 frames: smooth gradients plus noise, values 20..230 (autocontrast has work)."""
  rng = np.random.RandomState(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  base = np.stack([60 + 120 * xx, 40 + 150 * yy, 100 + 80 * xx * yy], -1)
  x = base[None] + rng.normal(0, 12, (t, h, w, 3))
  return np.clip(np.round(x), 20, 230).astype(np.uint8)


def run_op(name, x, sign=1.0, cutout_u=(0.3, 0.6)):
  op = ra.OPS.index(name)
  out = ra.apply_op(tf.constant(x, tf.float32), tf.constant(op), tf.constant(sign), M,
                    cutout_u=tf.constant(cutout_u, tf.float32))
  out = out.numpy()
  assert out.min() >= 0 and out.max() <= 255 and np.all(out == np.round(out)), name
  return out.astype(np.int64)


def assert_close(got, want, max_frac=0.002):
  """Equal, except that a few pixels may be one level off (float rounding ties)."""
  diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
  assert diff.max() <= 1, diff.max()
  assert (diff > 0).mean() <= max_frac, (diff > 0).mean()


def test_magnitudes_at_m7_follow_imgaug_formulas():
  mag = ra.magnitudes(7)
  assert mag['rotate_deg'] == pytest.approx(7.0)
  assert mag['posterize_bits'] == 7  # 8 - int(7*6/30 = 1.4)
  assert mag['solarize_threshold'] == 197  # 256 - int(7*256/30 = 59.7)
  assert mag['enhance'] == pytest.approx(0.21)  # factors 1 +- 0.21
  assert mag['shear_deg'] == pytest.approx(7 * np.rad2deg(0.3) / 30)
  assert mag['translate_frac'] == pytest.approx(0.077)  # 0.33 * 7/30, not 0.45
  assert mag['cutout_frac'] == pytest.approx(7 * 20 / 32 / 30)
  assert ra.magnitudes(30)['posterize_bits'] == 2 and ra.magnitudes(60)['cutout_frac'] == 20 / 32
  assert len(ra.OPS) == 18 and len(set(ra.OPS)) == 18


# ----- pixel-wise ops: numpy from imgaug's source


def test_invert_posterize_solarize_exact():
  x = textured(1)
  np.testing.assert_array_equal(run_op('invert', x), 255 - x.astype(np.int64))
  # quantize_uniform_to_n_bits(7): floor(v / 2) * 2 (bins of 256/128)
  np.testing.assert_array_equal(run_op('posterize', x), (x // 2) * 2)
  full = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  want = np.where(full >= 197, 255 - full.astype(np.int64), full)  # Invert(threshold=197)
  np.testing.assert_array_equal(run_op('solarize', full), want)


def np_autocontrast(img):
  out = np.empty_like(img)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    lo, hi = int(ch.min()), int(ch.max())
    if hi <= lo:
      lut = np.arange(256)
    else:
      scale = 255.0 / (hi - lo)
      lut = np.clip(np.arange(256).astype(np.float64) * scale - lo * scale, 0, 255).astype(np.uint8)
    out[..., c] = np.asarray(lut, np.uint8)[ch]
  return out


def np_equalize(img):
  out = np.empty_like(img)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    hist = np.bincount(ch.reshape(-1), minlength=256)
    step = np.sum(hist[:-1]) // 255
    if np.count_nonzero(hist) <= 1 or not step:
      lut = np.arange(256)
    else:
      cum = np.cumsum(hist)
      lut = np.empty(256, np.int64)
      lut[0] = step // 2
      lut[1:] = step // 2 + cum[:-1]
      lut //= step
    out[..., c] = np.clip(lut, None, 255).astype(np.uint8)[ch]
  return out


def test_autocontrast_and_equalize_per_frame_and_channel():
  x = textured(2)
  x[1] = x[1] // 2 + 40  # a second frame with another range: stats are per frame
  got = run_op('autocontrast', x)
  lo = x.min(axis=(1, 2), keepdims=True).astype(np.int64)
  hi = x.max(axis=(1, 2), keepdims=True).astype(np.int64)
  num = 255 * (x.astype(np.int64) - lo)
  np.testing.assert_array_equal(got, num // (hi - lo))  # the exact quotient's floor
  # imgaug's float64 table is one lower only at some exact-integer points (e.g. hi -> 254)
  imgaug = np.stack([np_autocontrast(f) for f in x]).astype(np.int64)
  diff = got - imgaug
  assert set(np.unique(diff)) <= {0, 1}
  assert (num[diff == 1] % np.broadcast_to(hi - lo, num.shape)[diff == 1] == 0).all()
  want_eq = np.stack([np_equalize(f) for f in x])
  np.testing.assert_array_equal(run_op('equalize', x), want_eq)
  flat = np.full((1, 8, 8, 3), 77, np.uint8)  # one value: unchanged by both
  np.testing.assert_array_equal(run_op('autocontrast', flat), flat)
  np.testing.assert_array_equal(run_op('equalize', flat), flat)


# ----- ops imgaug hands to PIL


PIL = pytest.importorskip('PIL')
from PIL import Image, ImageEnhance, ImageFilter  # noqa: E402


def per_frame(fn, x):
  return np.stack([np.asarray(fn(Image.fromarray(f))) for f in x]).astype(np.int64)


@pytest.mark.parametrize('name,cls', [('color', ImageEnhance.Color),
                                      ('contrast', ImageEnhance.Contrast),
                                      ('brightness', ImageEnhance.Brightness),
                                      ('sharpness', ImageEnhance.Sharpness)])
def test_enhance_ops_match_pil(name, cls):
  x = textured(3)
  for sign in (-1.0, 1.0):
    factor = 1.0 + sign * ra.magnitudes(M)['enhance']
    want = per_frame(lambda im, f=factor: cls(im).enhance(f), x)
    assert_close(run_op(name, x, sign), want)


def test_filters_match_pil():
  x = textured(4)
  assert_close(run_op('blur', x), per_frame(lambda im: im.filter(ImageFilter.BLUR), x))
  assert_close(run_op('smooth', x), per_frame(lambda im: im.filter(ImageFilter.SMOOTH), x))


def pil_warp(img, op, sign):
  """imgaug pillike.warp_affine: its matrix, PIL's AFFINE transform (nearest), fill 128."""
  h, w = img.shape[:2]
  mat = ra.affine_matrix(op, sign, h, w, M)
  out = Image.fromarray(img).transform((w, h), Image.AFFINE, tuple(mat.reshape(-1)),
                                       fillcolor=(128, 128, 128))
  return np.asarray(out).astype(np.int64)


@pytest.mark.parametrize('op', ra.GEOMETRIC)
def test_affine_ops_match_pil_nearest(op):
  x = textured(5, h=96, w=128)  # not square: centre and translate use both sides
  for sign in (-1.0, 1.0):
    got = run_op(op, x, sign)
    want = np.stack([pil_warp(f, op, sign) for f in x])
    mismatch = np.any(got != want, axis=-1).mean()
    assert mismatch < 0.002, (op, sign, mismatch)
    assert (got == 128).all(-1).mean() > 0.01  # something was filled


def test_affine_matrix_is_imgaugs():
  # rotate +7 deg about the centre (x right, y down), inverse handed to PIL
  mat = ra.affine_matrix('rotate', 1.0, 224, 224, M)
  a = np.deg2rad(7.0)
  fwd = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  np.testing.assert_allclose(mat[:, :2], np.linalg.inv(fwd), atol=1e-6)
  np.testing.assert_allclose(mat @ [112, 112, 1], [112, 112], atol=1e-4)  # centre fixed
  shear = ra.affine_matrix('shear_x', -1.0, 224, 224, M)
  t = np.tanh(np.deg2rad(ra.magnitudes(M)['shear_deg']))  # imgaug's tanh, not tan
  np.testing.assert_allclose(shear, [[1, t, 0], [0, 1, 0]], atol=1e-6)
  tx = ra.affine_matrix('translate_x', 1.0, 224, 300, M)
  np.testing.assert_allclose(tx, [[1, 0, -0.077 * 300], [0, 1, 0]], atol=1e-4)


def test_cutout_box_and_fill():
  x = textured(6)
  got = run_op('cutout', x, cutout_u=(0.3, 0.6))
  size = ra.magnitudes(M)['cutout_frac']
  y1, y2 = (0.6 - size / 2) * 224, (0.6 + size / 2) * 224
  x1, x2 = 0.3 * 224 - (y2 - y1) / 2, 0.3 * 224 + (y2 - y1) / 2
  want = x.astype(np.int64).copy()
  want[:, int(y1):int(y2), int(x1):int(x2)] = 128
  np.testing.assert_array_equal(got, want)
  edge = run_op('cutout', x, cutout_u=(0.0, 1.0))  # clamped at the image border
  assert (edge[:, -5:, :5] == 128).all() and (edge[:, :150] == x[:, :150]).all()


# ----- draws and the whole augmenter


def test_draws_distinct_ops_in_random_order_and_imgaug_initial_stage():
  firsts, flips, crops = set(), [], []
  for s in range(300):
    flip, crop, order, signs, u = ra.draw(tf.constant([s, 9]), 4, M)
    order = order.numpy().tolist()
    assert len(order) == 4 and len(set(order)) == 4  # SomeOf: distinct
    firsts.add(order[0])
    flips.append(bool(flip))
    crops.extend(crop.numpy().tolist())
    assert set(signs.numpy().tolist()) <= {-1.0, 1.0}
    assert 0 <= u.numpy().min() and u.numpy().max() < 1
  assert firsts == set(range(18))
  assert 110 < sum(flips) < 190
  assert 0 <= min(crops) and max(crops) <= M and np.mean(crops) == pytest.approx(M / 2, abs=0.4)


def test_whole_clip_same_ops_on_every_frame_and_seeded():
  frame = textured(7, t=1)
  clip = tf.constant(np.repeat(frame, 4, axis=0))
  a = ra.randaugment(clip, 4, M, tf.constant([1, 2])).numpy()
  b = ra.randaugment(clip, 4, M, tf.constant([1, 2])).numpy()
  np.testing.assert_array_equal(a, b)
  for t in range(1, 4):
    np.testing.assert_array_equal(a[0], a[t])
  c = ra.randaugment(clip, 4, M, tf.constant([1, 3])).numpy()
  assert np.abs(a - c).mean() > 1


@pytest.mark.parametrize('name', ['color', 'contrast', 'equalize', 'rotate', 'cutout'])
def test_flipped_clip_runs_its_ops_with_channels_reversed_and_normalize_restores_them(name):
  """randaugment_ops flips with ops.flip_bgr (channels come out B, G, R); color and contrast
  weigh the channels in that order: after normalize, the values of a plain flip."""
  from data_pipelines import ops
  x = tf.constant(textured(5, t=2), tf.float32)
  k = tf.constant([ra.OPS.index(name), ra.OPS.index('brightness')])
  signs, u = tf.constant([1.0, -1.0]), tf.constant([0.3, 0.6])
  got, bgr = ra.randaugment_ops(x, tf.constant(True), k, signs, u, M)
  assert bool(bgr)
  want = tf.reverse(x, [2])
  for i in range(2):
    want = ra.apply_op(want, k[i], signs[i], M, cutout_u=u)
  np.testing.assert_array_equal(got.numpy()[..., ::-1], want.numpy())
  mean, std = (120.0, 110.0, 100.0), (60.0, 61.0, 62.0)
  np.testing.assert_array_equal(ops.normalize(got, mean, std, bgr=bgr).numpy(),
                                ops.normalize(want, mean, std).numpy())


def test_crop_window_fold_is_close_to_crop_then_resize():
  """Folding imgaug's crop into the source window vs cropping the 224 image and resizing."""
  rng = np.random.RandomState(0)
  src = tf.image.resize(rng.uniform(0, 255, (1, 24, 24, 3)).astype(np.float32), [180, 200])
  crop = tf.constant([3.4, 6.6, 0.2, 5.1], tf.float64)  # top, right, bottom, left (224 px)
  top, left, h, w = [int(v) for v in ra.crop_window(10, 20, 150, 160, crop, 224)]
  folded = tf.image.resize(src[:, top:top + h, left:left + w], [224, 224]).numpy()
  full = tf.image.resize(src[:, 10:160, 20:180], [224, 224])
  px = np.round(crop.numpy()).astype(int)
  two_step = tf.image.resize(full[:, px[0]:224 - px[2], px[3]:224 - px[1]], [224, 224]).numpy()
  assert (top, left) == (10 + round(3 / 224 * 150), 20 + round(5 / 224 * 160))
  assert np.abs(folded - two_step).mean() < 2.0


def _tied_luminance_clip():
  """Half of each frame at luminance 100, half at 101: the mean is exactly 100.5, where
  contrast's rounding (to 101) is easiest to get wrong."""
  x = np.zeros((2, 96, 128, 3), np.float32)
  x[:, :48], x[:, 48:] = 100, 101
  return x


def _xla_against_tf_ops(m):
  """Every op, both signs, both channel orders: apply_op's XLA path against its TF-ops path
  (xla=False), on noise at 224x224, a textured clip and a tied-luminance clip."""
  rng = np.random.default_rng(int(m))
  clips = [rng.integers(0, 256, (1, 224, 224, 3)).astype(np.float32),
           textured(int(m), h=96, w=128).astype(np.float32), _tied_luminance_clip()]
  for x in map(tf.constant, clips):
    for k, name in enumerate(ra.OPS):
      for sign in (-1.0, 1.0):
        for bgr in (False, True):
          args = (x, tf.constant(k), tf.constant(sign), m)
          kw = dict(cutout_u=tf.constant([0.3, 0.6]), bgr=tf.constant(bgr))
          np.testing.assert_array_equal(ra.apply_op(*args, **kw, xla=True).numpy(),
                                        ra.apply_op(*args, **kw, xla=False).numpy(),
                                        err_msg=f'{name} sign {sign} bgr {bgr} m {m}')


def test_xla_path_gives_the_tf_ops_values_bit_for_bit():
  """apply_op runs most ops as one XLA computation and finishes the filters in XLA, with
  the values of the TF ops. In a subprocess with XLA's default code optimisation: the tests'
  level 0 (conftest) would hide what matters here, the fused multiply-adds LLVM makes at
  full optimisation (without `ra._blend`'s guard, color and contrast differ by a level in
  ~0.1 % of the values of the 224x224 noise)."""
  import subprocess
  import sys
  from conftest import ROOT, cpu_env
  code = ('import sys; sys.path.insert(0, "tests"); import test_randaugment as t\n'
          'for m in (7,):\n  t._xla_against_tf_ops(m)\nprint("ok")')
  env = cpu_env(1, optimized=True)
  # XLA_FLAGS as set for JAX, with a flag TF's XLA does not know: it would abort the
  # process at TF's first XLA compilation, had `ra._start_tf_xla` not made that one without it
  env['XLA_FLAGS'] += ' --xla_flag_that_only_another_xla_version_knows=true'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_contrast_rounds_a_tied_mean_luminance_up_as_pil():
  x = _tied_luminance_clip()
  for factor in (0.79, 1.21):
    want = per_frame(lambda im, f=factor: ImageEnhance.Contrast(im).enhance(f), x.astype(np.uint8))
    for xla in (False, True):
      got = ra.contrast(tf.constant(x), factor, xla=xla).numpy()
      np.testing.assert_array_equal(got, want, err_msg=f'factor {factor} xla {xla}')
