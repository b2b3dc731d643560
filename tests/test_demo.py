"""Moving Digits and `make demo`: the data means what it says, the ablation shows AIM's claim."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import cpu_env
from projects.moving_digits import data as md

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ generator


def test_generator_is_deterministic_for_a_seed():
  a = list(md.clips('train', 2, seed=3))
  b = list(md.clips('train', 2, seed=3))
  c = list(md.clips('train', 2, seed=4))
  assert len(a) == 2 * len(md.MOTIONS)
  for x, y in zip(a, b):
    assert (x.name, x.motion, x.digit) == (y.name, y.motion, y.digit)
    np.testing.assert_array_equal(x.video, y.video)
  assert any(not np.array_equal(x.video, z.video) for x, z in zip(a, c))


def test_clip_shape_and_labels_are_balanced():
  cs = list(md.clips('test', 3, seed=0))
  assert cs[0].video.shape == (8, 32, 32, 3) and cs[0].video.dtype == np.uint8
  motions = np.bincount([c.motion for c in cs], minlength=8)
  np.testing.assert_array_equal(motions, 3)
  assert all(0 <= c.digit <= 9 for c in cs)


def test_second_class_of_a_pair_is_the_time_reversal_of_the_first():
  """Same rng draws for a pair's two classes -> the same frames in reverse order."""
  cfg = md.MovingDigitsConfig()
  digit = md.digit_images(0)['train'][0][5]
  for first, second in md.PAIRS:
    fwd = md.motion_clip(digit, first, np.random.default_rng(11), cfg)
    rev = md.motion_clip(digit, second, np.random.default_rng(11), cfg)
    np.testing.assert_array_equal(rev, fwd[::-1])
    assert not np.array_equal(fwd[0], fwd[-1])          # the digit really moves


def test_motions_move_the_digit_the_way_their_names_say():
  cfg = md.MovingDigitsConfig(noise_std=0.0)
  digit = md.digit_images(0)['train'][0][0]
  bg = np.zeros((8, 32, 32, 3))

  def centroid_and_mass(motion):
    centers, scales, angles = md.motion_pose(motion, np.random.default_rng(1), cfg)
    v = md.render(digit, centers, scales, angles, bg, np.full(3, 255.0)).mean(-1)
    ys, xs = np.mgrid[:32, :32]
    m = v.sum((1, 2))
    return (v * xs).sum((1, 2)) / m, (v * ys).sum((1, 2)) / m, m

  x, _, _ = centroid_and_mass(0)
  assert x[-1] < x[0] - 8                               # left
  _, y, _ = centroid_and_mass(2)
  assert y[-1] < y[0] - 8                               # up (y points down)
  _, _, mass = centroid_and_mass(4)
  assert mass[-1] > 2 * mass[0]                         # zoom in: the digit grows
  centers, scales, angles = md.motion_pose(6, np.random.default_rng(1), cfg)
  assert np.all(np.diff(angles) > 0)                    # clockwise on screen (y down)


def test_test_clips_use_held_out_digit_images():
  imgs = md.digit_images(0)
  train = {im.tobytes() for im in imgs['train'][0]}
  test = [im.tobytes() for im in imgs['test'][0]]
  assert len(test) > 300
  # load_digits has a few exact duplicate images; almost all test images are unseen.
  assert sum(t in train for t in test) < 0.02 * len(test)


def test_mp4_round_trip_and_annotation_lists(tmp_path):
  n = md.write_split(tmp_path, 'test', 1, seed=0, progress=False)
  assert n == 8
  for label_set, k in (('motion', 8), ('appearance', 10)):
    rows = md.annotation_path(tmp_path, 'test', label_set).read_text().split('\n')
    rows = [r.split() for r in rows if r]
    assert len(rows) == 8
    assert all((tmp_path / 'videos' / p).exists() and 0 <= int(lab) < k for p, lab in rows)
  clip = next(md.clips('test', 1, seed=0))
  decoded = md.read_mp4(tmp_path / 'videos' / 'test' / f'{clip.name}.mp4')
  assert decoded.shape == clip.video.shape
  # Near-lossless H.264 (4:2:0 chroma costs a few levels on coloured edges).
  assert np.abs(decoded.astype(int) - clip.video).mean() < 8


# --------------------------------------------------------------- demo pieces


def test_within_pair_accuracy_is_half_for_a_direction_blind_model():
  from projects.moving_digits import demo
  blind = np.zeros((8, 8), int)
  for a, b in md.PAIRS:
    blind[a, a] = blind[a, b] = blind[b, a] = blind[b, b] = 5
  assert demo.within_pair_accuracy(blind, md.PAIRS) == [0.5] * 4
  assert demo.within_pair_accuracy(np.eye(8, dtype=int) * 3, md.PAIRS) == [1.0] * 4


def test_demo_config_variants():
  from projects.moving_digits import config as demo_config
  from aim_jax.models import factory
  for variant, (enabled, s, t, j) in demo_config.ADAPTERS.items():
    c = demo_config.get_config(f'variant={variant},task=motion,root=/r')
    m = factory.resolve_model_config(c.model)
    assert m['adapters']['enabled'] == enabled
    a = m['adapters']
    assert (a['spatial'], a['temporal'], a['joint']) == (s, t, j)
    assert c.full_finetune == (variant == 'full')
    assert c.data.flip_prob == 0.0                      # a flip would turn left into right
    assert c.init_from == '/r/pretrained'
  with pytest.raises(ValueError, match='variant'):
    demo_config.get_config('variant=nope')
  # The clip length is the model's; the data config follows it.
  c = demo_config.get_config('frames=4')
  assert c.model.num_frames == 4 and c.data.num_frames == 4
  with pytest.raises(ValueError, match='frames=9'):
    demo_config.get_config('frames=9')


def test_demo_commands_name_only_what_differs_from_the_config_defaults():
  # Finished steps are keyed by the config argument: a full run's keys stay as they were.
  from projects.moving_digits import demo
  full = demo.config_arg(pathlib.Path('/w'), 'motion', 'aim', 600)
  assert 'batch=' not in full and 'frames=' not in full
  ci = demo.sizes()['ci']
  arg = demo.config_arg(pathlib.Path('/w'), 'motion', 'aim', 400, batch=ci.batch,
                        frames=ci.frames)
  assert 'batch=16,' in arg and 'frames=4,' in arg


def test_pretrained_checkpoint_reads_like_a_clip_conversion(tmp_path):
  from aim_jax import checkpoints
  from projects.moving_digits import pretrain
  from aim_jax.models import factory
  from projects.moving_digits import config as demo_config
  pretrain.pretrain(str(tmp_path / 'pre'), demo_config.BACKBONE, steps=3, batch=8,
                           pool=64)
  params, cfg, meta = checkpoints.load_params(str(tmp_path / 'pre'))
  assert cfg['backbone'] == 'clip' and cfg['width'] == 64 and cfg['patch_size'] == 8
  assert meta['kind'] == 'image'
  # Exactly the encoder's parameter tree: no probe head left in it.
  import flax.linen as nn
  import jax
  enc = factory.build_encoder(cfg)
  like = nn.unbox(jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0),
                                                  np.zeros((1, 32, 32, 3)))))['params']
  got = jax.tree_util.tree_map(np.shape, params)
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), like)
  assert got == want


# ------------------------------------------------------------ the CI demo run


@pytest.mark.slow
def test_ci_demo_shows_that_aim_tells_motions_apart_and_spatial_adapters_do_not(tmp_path):
  # Two CPU devices, one per core: the same results as eight (400 steps of AIM at batch 16:
  # 53.9% top-1 with either), and faster to compile and run here (spatial 50 s instead of 60).
  env = cpu_env(2, optimized=True)  # 400-step runs: run time, not compile time
  proc = subprocess.run([sys.executable, '-m', 'projects.moving_digits.demo',
                         '--workdir', str(tmp_path),
                         '--size', 'ci'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'Report:' in proc.stdout
  report = tmp_path / 'report'
  for f in ('README.md', 'curves.png', 'confusion_motion_spatial.png', 'confusion_motion_aim.png'):
    assert (report / f).exists(), f
  res = json.loads((report / 'results.json').read_text())['results']
  motion, appearance = res['motion'], res['appearance']
  spatial = motion['spatial']['top1']
  assert motion['aim']['top1'] > spatial + 0.25, motion
  for variant, r in appearance.items():
    assert r['top1'] > 0.5, (variant, r['top1'])       # chance is 10%
  # A second run reuses every finished step.
  again = subprocess.run([sys.executable, '-m', 'projects.moving_digits.demo',
                          '--workdir', str(tmp_path),
                          '--size', 'ci'], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '-m aim_jax.train --config' not in again.stdout and 'reusing' in again.stdout
