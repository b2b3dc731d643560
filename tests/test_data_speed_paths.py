"""The pipeline's fast paths give what the plain formulation of the same recipe gives."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from data_pipelines import config as config_lib  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402
from data_pipelines import ops  # noqa: E402
from data_pipelines import randaugment as ra  # noqa: E402
from data_pipelines import records  # noqa: E402


def encoded_clip(t=4, h=72, w=96, seed=0):
  rng = np.random.RandomState(seed)
  base = tf.image.resize(rng.uniform(0, 255, (1, 9, 12, 3)).astype(np.float32), [h, w + t])
  frames = [np.clip(base[0, :, i:i + w].numpy() + rng.normal(0, 6, (h, w, 3)), 0, 255)
            for i in range(t)]
  return tf.stack([tf.io.encode_jpeg(f.astype(np.uint8), quality=95) for f in frames])


def ssv2_cfg(m, **kw):
  cfg = config_lib.default_data_config()
  cfg.num_frames, cfg.image_size, cfg.train_short_side = 4, 48, 72
  cfg.flip_prob, cfg.randaugment_n, cfg.randaugment_m = 0.0, 4, m
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def reference_ra_clip(encoded, cfg, seeds):
  """Official order: crop + resize to 224, recipe flip, then imgaug's flip, crop + resize
  back, and the ops, each on uint8 values."""
  video = ops.decode_crop_resize(encoded, short_side=cfg.train_short_side, size=cfg.image_size,
                                 seed=seeds[1], area_range=tuple(cfg.area_range),
                                 aspect_ratio_range=tuple(cfg.aspect_ratio_range))
  video = ops.random_flip(video, cfg.flip_prob, seeds[2])
  x = tf.round(video).numpy()
  flip, crop, order, signs, u = ra.draw(seeds[3], cfg.randaugment_n, cfg.randaugment_m)
  if bool(flip):
    x = x[:, :, ::-1]
  s = cfg.image_size
  px = np.round(crop.numpy() * s / 224).astype(int)  # top, right, bottom, left
  if px.any():
    x = tf.round(tf.image.resize(x[:, px[0]:s - px[2], px[3]:s - px[1]], [s, s])).numpy()
  x = tf.constant(x, tf.float32)
  out, bgr = ra.randaugment_ops(x, tf.constant(False), order, signs, u, cfg.randaugment_m)
  assert not bool(bgr)
  return out.numpy()


def ra_clip_rgb(enc, cfg, seeds):
  """The pipeline's RandAugment clip, its channels put back in RGB order where it flipped
  (ops.flip_bgr)."""
  got, bgr = input_pipeline._randaugment_clip(enc, cfg, seeds)
  return got.numpy()[..., ::-1] if bool(bgr) else got.numpy()


@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_randaugment_fold_exact_when_there_is_no_crop(flip_prob):
  # m = 0: imgaug crops nothing, so folding its crop into the window changes nothing; the
  # merged flips and the op order must then give exactly the reference clip
  enc = encoded_clip()
  cfg = ssv2_cfg(0, flip_prob=flip_prob)
  for s in range(6):
    seeds = tf.random.experimental.stateless_split(tf.constant([s, 5], tf.int64), 6)
    got = ra_clip_rgb(enc, cfg, seeds)
    np.testing.assert_array_equal(got, reference_ra_clip(enc, cfg, seeds))


def test_randaugment_fold_close_at_m7():
  enc = encoded_clip(seed=1)
  cfg = ssv2_cfg(7)
  diffs = []
  for s in range(8):
    seeds = tf.random.experimental.stateless_split(tf.constant([s, 6], tf.int64), 6)
    got = ra_clip_rgb(enc, cfg, seeds)
    diffs.append(np.abs(got - reference_ra_clip(enc, cfg, seeds)).mean())
  # one interpolation instead of two and a sub-pixel shift of the crop: a few levels at most
  assert np.median(diffs) < 4.0, diffs


def test_three_crop_views_normalised_before_slicing_are_unchanged():
  rng = np.random.RandomState(2)
  frames = tf.constant(rng.randint(0, 256, (6, 40, 60, 3)).astype(np.uint8))
  cfg = config_lib.default_data_config()
  cfg.num_frames, cfg.image_size, cfg.test_short_side = 3, 32, 32
  cfg.test_clips, cfg.test_crops = 2, 3
  got = input_pipeline.eval_views_from_frames(frames, cfg, split='test').numpy()
  resized = ops.resize_short_side(frames, 32)
  want = ops.normalize(ops.three_crop(resized, 32), cfg.mean, cfg.std)
  want = tf.reshape(want, [6, 3, 32, 32, 3]).numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_benchmark_stages_build_the_recipes(tmp_path):
  from benchmarks import pipeline_benchmark
  pattern = pipeline_benchmark.write_records(str(tmp_path), num_videos=4, num_frames=12)
  long_pattern = pipeline_benchmark.write_records(str(tmp_path), num_videos=4, num_frames=20,
                                         name='benchlong')
  assert long_pattern == pattern.replace('bench-train', 'benchlong-train')
  it, per = pipeline_benchmark._stage_dataset('train_ra', 4, pattern)
  assert next(it)['video'].shape == (8, 4, 224, 224, 3) and per == 8
  # evaluation stages read their own test splits (here the one prepared at 224)
  small = pipeline_benchmark.write_records(str(tmp_path), num_videos=12, num_frames=4,
                                           name='bench224test', short_side=224)
  frame = tf.io.decode_jpeg(next(iter(tf.data.TFRecordDataset(tf.io.gfile.glob(small))
                                      .map(records.parse_sequence_example)))['frames'][0])
  assert frame.shape == (224, 298, 3)
  # one epoch of 12 videos in batches of 8: the first batch is the pipeline's start, untimed
  it, _ = pipeline_benchmark._stage_dataset('eval_3crop_224', 4, pattern)
  n, dt, cpu = pipeline_benchmark._eval_epochs(it, 0.0)
  assert n == 4 and dt > 0 and cpu > 0
  it, _ = pipeline_benchmark._stage_dataset('train_long', 4, pattern)
  assert next(it)['video'].shape == (8, 4, 224, 224, 3)


def test_eval_decodes_repeated_frames_once_with_the_same_views():
  enc = encoded_clip(t=6, seed=3)  # 6 frames, 3 clips of 4 x interval 2: offsets 0, wrapped
  cfg = config_lib.default_data_config()
  cfg.num_frames, cfg.frame_interval, cfg.image_size, cfg.test_short_side = 4, 2, 48, 48
  cfg.test_clips, cfg.test_crops = 3, 1
  got = input_pipeline.eval_views(enc, cfg, split='test').numpy()
  from data_pipelines import sampling
  idx = sampling.dense_test_indices(6, 4, 2, 3).numpy().reshape(-1)
  assert len(set(idx.tolist())) < len(idx)
  frames = ops.decode_frames(tf.gather(enc, idx))
  want = input_pipeline.eval_views_from_frames(frames, cfg, split='test').numpy()
  np.testing.assert_array_equal(got, want)
  long_enc = encoded_clip(t=40, seed=4)  # no repeats: the plain path
  got = input_pipeline.eval_views(long_enc, cfg, split='test').numpy()
  idx = sampling.dense_test_indices(40, 4, 2, 3).numpy().reshape(-1)
  want = input_pipeline.eval_views_from_frames(ops.decode_frames(tf.gather(long_enc, idx)), cfg,
                                               split='test').numpy()
  np.testing.assert_array_equal(got, want)
