"""Frame samplers and clip ops, checked exactly against the official (mmaction2) arithmetic."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from data_pipelines import ops  # noqa: E402
from data_pipelines import sampling  # noqa: E402


# ----- numpy references written from docs/sampling.md (mmaction2 SampleFrames)


def ref_dense_test(n, clip_len, interval, num_clips):
  ori = clip_len * interval
  avg = (n - ori + 1) / float(num_clips)
  if n > ori - 1:
    offsets = (np.arange(num_clips) * avg + avg / 2.0).astype(int)
  else:
    offsets = np.zeros(num_clips, int)
  return np.mod(offsets[:, None] + np.arange(clip_len)[None] * interval, n)


def ref_segments(n, clip_len):
  seg = (n - 1) / clip_len
  return ([int(np.round(seg * i)) for i in range(clip_len)],
          [int(np.round(seg * (i + 1))) for i in range(clip_len)])


@pytest.mark.parametrize('n,clip_len,interval,clips', [
    (300, 32, 4, 3), (250, 8, 16, 3), (129, 32, 4, 3), (100, 32, 4, 3), (10, 8, 2, 1),
    (17, 8, 2, 4), (64, 8, 8, 1)])
def test_dense_test_clips_equal_official_offsets(n, clip_len, interval, clips):
  got = sampling.dense_test_indices(n, clip_len, interval, clips).numpy()
  np.testing.assert_array_equal(got, ref_dense_test(n, clip_len, interval, clips))


def test_dense_test_k400_offsets_by_hand():
  # n=300, 32x4: avg = (300-128+1)/3 = 57.67 -> offsets int(28.83), int(86.5), int(144.17).
  got = sampling.dense_test_indices(300, 32, 4, 3).numpy()
  assert got[:, 0].tolist() == [28, 86, 144]
  assert (np.diff(got, axis=1) == 4).all()


def test_dense_train_offset_range_and_wraparound():
  offsets = set()
  for s in range(400):
    idx = sampling.dense_train_indices(40, 8, 4, tf.constant([s, 0])).numpy()
    assert (np.diff(idx) == 4).all()
    offsets.add(int(idx[0]))
  # offsets cover exactly [0, n - clip_len*interval] = [0, 8]
  assert offsets == set(range(0, 9))
  # a 10-frame video with a 16-frame window: offset 0, indices loop around (out_of_bound 'loop')
  idx = sampling.dense_train_indices(10, 8, 2, tf.constant([3, 4])).numpy()
  assert idx.tolist() == [0, 2, 4, 6, 8, 0, 2, 4]


@pytest.mark.parametrize('n,clip_len', [(100, 8), (37, 8), (8, 8), (5, 8), (200, 32), (49, 16)])
def test_uniform_test_is_segment_middle(n, clip_len):
  start, end = ref_segments(n, clip_len)
  want = [(s + e) // 2 for s, e in zip(start, end)]
  assert sampling.uniform_test_indices(n, clip_len, 1).numpy()[0].tolist() == want


def test_uniform_round_half_to_even_like_numpy():
  # n=10, T=4: seg=2.25 -> round(2.25)=2, round(4.5)=4 (half to even), round(6.75)=7, 9.
  start, end = ref_segments(10, 4)
  assert start == [0, 2, 4, 7] and end == [2, 4, 7, 9]
  got = sampling.uniform_test_indices(10, 4, 1).numpy()[0].tolist()
  assert got == [1, 3, 5, 8]


def test_uniform_train_draws_inside_each_segment_inclusive():
  n, t = 37, 8
  start, end = ref_segments(n, t)
  seen = [set() for _ in range(t)]
  for s in range(300):
    idx = sampling.uniform_train_indices(n, t, tf.constant([s, 1])).numpy()
    for i, v in enumerate(idx):
      assert start[i] <= v <= end[i]
      seen[i].add(int(v))
  for i in range(t):  # both ends reachable: random.randint is inclusive
    assert seen[i] == set(range(start[i], end[i] + 1))


def test_samplers_reject_unknown_mode():
  with pytest.raises(ValueError, match='sampling'):
    sampling.train_indices(10, sampling='tsn', clip_len=8, interval=1, seed=tf.constant([0, 0]))


# ----- spatial ops


def coord_clip(t=2, h=6, w=10):
  """Frames whose R channel is the column, G the row, B the frame index."""
  x = np.zeros((t, h, w, 3), np.uint8)
  x[..., 0] = np.arange(w)[None, None, :]
  x[..., 1] = np.arange(h)[None, :, None]
  x[..., 2] = np.arange(t)[:, None, None]
  return x


def test_short_side_size_rounds_like_mmcv():
  # 240x320 -> short 224: scale 0.9333, width int(298.67 + 0.5) = 299
  h, w = ops.short_side_size(240, 320, 224)
  assert (int(h), int(w)) == (224, 299)
  h, w = ops.short_side_size(341, 256, 256)
  assert (int(h), int(w)) == (341, 256)


def test_center_crop_offsets():
  x = coord_clip(h=7, w=10)
  c = ops.center_crop(tf.constant(x), 4).numpy()
  assert c[0, 0, 0, 0] == (10 - 4) // 2 and c[0, 0, 0, 1] == (7 - 4) // 2


def test_three_crop_order_and_offsets_wide_and_tall():
  x = coord_clip(h=4, w=11)  # step = (11-4)//2 = 3: left 0, right 2*3=6 (not 7), middle 3
  v = ops.three_crop(tf.constant(x), 4).numpy()
  assert v.shape == (3, 2, 4, 4, 3)
  assert [int(v[k, 0, 0, 0, 0]) for k in range(3)] == [0, 6, 3]
  xt = coord_clip(h=11, w=4)
  v = ops.three_crop(tf.constant(xt), 4).numpy()
  assert [int(v[k, 0, 0, 0, 1]) for k in range(3)] == [0, 6, 3]
  np.testing.assert_array_equal(v[2], xt[:, 3:7])


def test_flip_whole_clip():
  x = tf.constant(coord_clip())
  np.testing.assert_array_equal(ops.random_flip(x, 1.0, tf.constant([0, 0])).numpy(),
                                coord_clip()[:, :, ::-1])
  np.testing.assert_array_equal(ops.random_flip(x, 0.0, tf.constant([0, 0])).numpy(), coord_clip())
  flips = [bool(ops.random_flip(x, 0.5, tf.constant([s, 0])).numpy()[0, 0, 0, 0] != 0)
           for s in range(200)]
  assert 60 < sum(flips) < 140


def test_channel_reversing_flip_then_normalize_equals_flip_then_normalize_exactly():
  """`flip_bgr` reverses (W, C) together; normalize and pca_lighting read the channels back
  in order: the same values, bit for bit, as a plain flip."""
  from data_pipelines.config import CLIP_MEAN, CLIP_STD
  x = tf.constant(np.random.RandomState(1).randint(0, 256, (2, 5, 7, 3)).astype(np.float32))
  for flip in (True, False):
    y, bgr = ops.flip_bgr(x, tf.constant(flip))
    assert bool(bgr) == flip
    want = x[:, :, ::-1] if flip else x
    np.testing.assert_array_equal(y.numpy(), (want[..., ::-1] if flip else want).numpy())
    np.testing.assert_array_equal(ops.normalize(y, CLIP_MEAN, CLIP_STD, bgr=bgr).numpy(),
                                  ops.normalize(want, CLIP_MEAN, CLIP_STD).numpy())
    seed = tf.constant([3, 4])
    np.testing.assert_array_equal(
        ops.normalize(ops.pca_lighting(y, 0.1, seed, bgr=bgr), CLIP_MEAN, CLIP_STD,
                      bgr=bgr).numpy(),
        ops.normalize(ops.pca_lighting(want, 0.1, seed), CLIP_MEAN, CLIP_STD).numpy())
  # the same draw as random_flip
  for s in range(20):
    seed = tf.constant([s, 0])
    y, bgr = ops.random_flip_bgr(x, 0.5, seed)
    np.testing.assert_array_equal(ops.normalize(y, CLIP_MEAN, CLIP_STD, bgr=bgr).numpy(),
                                  ops.normalize(ops.random_flip(x, 0.5, seed), CLIP_MEAN,
                                                CLIP_STD).numpy())
  y, bgr = ops.random_flip_bgr(x, 0.0, tf.constant([0, 0]))
  assert not bool(bgr) and y is x


def test_normalize_with_clip_mean_std():
  from data_pipelines.config import CLIP_MEAN, CLIP_STD
  x = np.random.RandomState(0).randint(0, 256, (2, 3, 4, 5, 3)).astype(np.uint8)  # (V,T,H,W,3)
  got = ops.normalize(tf.constant(x), CLIP_MEAN, CLIP_STD).numpy()
  want = (x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_random_resized_crop_box_ranges_and_fallback():
  areas, ratios = [], []
  for s in range(200):
    top, left, h, w = [int(v) for v in ops.random_resized_crop_box(
        256, 340, tf.constant([s, 7]), (0.08, 1.0), (3 / 4, 4 / 3))]
    assert 0 <= top <= 256 - h and 0 <= left <= 340 - w
    areas.append(h * w / (256 * 340))
    ratios.append(w / h)
  # sides are rounded, so allow a pixel of slack on the ranges
  assert min(areas) > 0.07 and max(areas) <= 1.0
  assert min(ratios) > 0.74 and max(ratios) < 1.35
  # impossible ranges fall back to the centre square
  top, left, h, w = [int(v) for v in ops.random_resized_crop_box(
      100, 160, tf.constant([1, 1]), (2.0, 3.0), (1.0, 1.0))]
  assert (top, left, h, w) == (0, 30, 100, 100)


def test_decode_crop_resize_crop_window_path_equals_full_decode():
  """Decoding only the crop window gives the same clip as decode -> crop -> resize."""
  rng = np.random.RandomState(0)
  frames = rng.randint(0, 255, (3, 64, 96, 3)).astype(np.uint8)
  encoded = tf.stack([tf.io.encode_jpeg(f, quality=95) for f in frames])
  seed = tf.constant([5, 6])
  got = ops.decode_crop_resize(encoded, short_side=64, size=32, seed=seed, area_range=(0.08, 1.0),
                               aspect_ratio_range=(0.75, 4 / 3)).numpy()
  top, left, h, w = [int(v) for v in ops.random_resized_crop_box(64, 96, seed, (0.08, 1.0),
                                                                 (0.75, 4 / 3))]
  full = ops.decode_frames(encoded)[:, top:top + h, left:left + w]
  want = tf.image.resize(tf.cast(full, tf.float32), [32, 32]).numpy()
  np.testing.assert_allclose(got, want, atol=1e-3)
  # Stored at another short side: frames are resized first, then cropped.
  got2 = ops.decode_crop_resize(encoded, short_side=128, size=32, seed=seed,
                                area_range=(0.08, 1.0), aspect_ratio_range=(0.75, 4 / 3)).numpy()
  top, left, h, w = [int(v) for v in ops.random_resized_crop_box(128, 192, seed, (0.08, 1.0),
                                                                 (0.75, 4 / 3))]
  big = tf.image.resize(tf.cast(ops.decode_frames(encoded), tf.float32), [128, 192])
  want2 = tf.image.resize(big[:, top:top + h, left:left + w], [32, 32]).numpy()
  np.testing.assert_allclose(got2, want2, atol=1e-3)


def ref_timm_box(h, w, areas, log_ratios, u_top, u_left):
  """timm 0.5.4 RandomErasing._erase for given uniform draws (count 1, 10 attempts)."""
  for target, lr in zip(areas, log_ratios, strict=True):
    target = target * h * w
    ratio = np.exp(lr)
    bh, bw = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if bw < w and bh < h:
      return int(np.floor(u_top * (h - bh + 1))), int(np.floor(u_left * (w - bw + 1))), bh, bw
  return None


def test_erasing_box_follows_timm_draws():
  for s in range(30):
    seed = tf.constant([s, 11])
    seeds = tf.random.experimental.stateless_split(seed, 3)
    areas = tf.random.stateless_uniform([10], seeds[0], 0.02, 1 / 3, dtype=tf.float64).numpy()
    logr = tf.random.stateless_uniform([10], seeds[1], np.log(0.3), np.log(1 / 0.3),
                                       dtype=tf.float64).numpy()
    u = tf.random.stateless_uniform([2], seeds[2], dtype=tf.float64).numpy()
    ok, top, left, bh, bw = [int(v) for v in ops.erasing_box(32, 48, seed)]
    want = ref_timm_box(32, 48, areas, logr, u[0], u[1])
    assert bool(ok) == (want is not None)
    if want is not None:
      assert (top, left, bh, bw) == want


def test_random_erasing_fills_zero_same_box_every_frame():
  x = tf.fill([4, 32, 32, 3], 7.0)
  hits = 0
  for s in range(20):
    y = ops.random_erasing(x, 1.0, tf.constant([s, 3])).numpy()
    mask = y != 7.0
    if mask.any():
      hits += 1
      assert (y[mask] == 0).all()  # timm mode 'const': zeros on the normalised clip
      np.testing.assert_array_equal(mask[0], mask[3])
      frac = mask[0].any(-1).mean()
      assert 0.015 < frac < 0.37  # sides are rounded: slightly above 1/3 is possible
  assert hits >= 18
  np.testing.assert_array_equal(ops.random_erasing(x, 0.0, tf.constant([0, 0])).numpy(), x.numpy())
  applied = [bool((ops.random_erasing(x, 0.25, tf.constant([s, 4])).numpy() == 0).any())
             for s in range(200)]
  assert 25 < sum(applied) < 75


def test_pca_lighting_one_shift_per_clip():
  x = tf.zeros([3, 4, 4, 3])
  y = ops.pca_lighting(x, 0.1, tf.constant([1, 2])).numpy()
  shift = y[0, 0, 0]
  assert np.abs(shift).max() > 0
  np.testing.assert_allclose(y, np.broadcast_to(shift, y.shape))


# ----- RandAugment: tests/test_randaugment.py


# ----- batch-level options


def test_label_smoothing_and_mixup():
  from data_pipelines import batch_ops
  t = batch_ops.one_hot_targets(np.array([0, 2]), 4, smoothing=0.1)
  np.testing.assert_allclose(t[0], [0.925, 0.025, 0.025, 0.025])
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='outside'):
    batch_ops.one_hot_targets(np.array([4]), 4)
  video = np.stack([np.zeros((2, 2)), np.ones((2, 2))]).astype(np.float32)
  mv, mt, lam = batch_ops.mixup(video, t, 0.8, seed=0, step=5)
  np.testing.assert_allclose(mv[0], 1.0 - lam)
  np.testing.assert_allclose(mt[0], lam * t[0] + (1 - lam) * t[1], rtol=1e-6)
  assert batch_ops.mixup(video, t, 0.8, seed=0, step=5)[2] == lam
  assert batch_ops.mixup(video, t, 0.0, seed=0, step=5)[2] == 1.0
