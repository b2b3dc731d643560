r"""Moving Digits: a built-in video data set where motion needs time and appearance does not.

Each clip shows one handwritten digit (scikit-learn's bundled `load_digits`,
8x8 images, no download) that moves over a smooth random texture with
per-frame noise. Every clip carries two labels:

  appearance  the digit (0-9): one frame suffices, as on Kinetics;
  motion      one of MOTIONS: left, right, up, down, zoom in, zoom out,
              rotate clockwise, rotate counter-clockwise.

The motion classes come in pairs (left/right, up/down, zoom in/out, cw/ccw)
and the second class of a pair is *rendered as the exact time reversal* of a
clip of the first: both classes have the same distribution over the set of
frames, so a model that pools per-frame features without temporal modelling
cannot beat 50% within a pair. That is the paper's point made measurable.

Test clips use digit images that no train clip (and no pre-training frame)
ever shows. Everything is deterministic for a seed: clip i of a split is drawn
from its own generator seeded by (seed, split, i).

Writes real mp4 files (PyAV, H.264) and `path label` annotation lists that
`python -m data_pipelines.prepare` turns into DMVR TFRecords:

  python -m projects.moving_digits.data --out /tmp/md --train_per_class 200 \
      --test_per_class 50
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import subprocess
import sys
import time
from typing import Iterator, Sequence

import numpy as np

MOTIONS = ('left', 'right', 'up', 'down', 'zoom_in', 'zoom_out', 'rotate_cw', 'rotate_ccw')
# (first, time-reversed second) class pairs.
PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))
LABEL_SETS = ('motion', 'appearance')
NUM_CLASSES = {'motion': len(MOTIONS), 'appearance': 10}
SPLITS = ('train', 'test')
_SPLIT_ID = {'train': 0, 'test': 1, 'pretrain': 2, 'pretest': 3}


@dataclasses.dataclass(frozen=True)
class MovingDigitsConfig:
  """Geometry of the clips (measured to work for a 32px, patch-8 ViT; see docs)."""
  canvas: int = 32
  num_frames: int = 8
  step_px: float = 2.0            # translation per frame
  translate_scale: tuple = (1.5, 2.0)   # digit scale (x 8 px) for translations and rotations
  zoom_small: tuple = (1.1, 1.3)
  zoom_large: tuple = (2.1, 2.3)
  rotate_deg_per_frame: float = 10.0
  rotate_limit_deg: float = 45.0
  static_angle_deg: float = 15.0  # random fixed tilt of translating/zooming digits
  noise_std: float = 8.0          # per-frame pixel noise, 0..255 scale
  test_fraction: float = 0.2      # share of the digit images held out for test clips
  fps: int = 8


# ---------------------------------------------------------------- digit images


def digit_images(seed: int, test_fraction: float = 0.2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train'|'test': (images (N, 8, 8) float32 in [0, 1], digits (N,) int)}.

  The split is by image, so test clips show handwriting never seen in training.
  """
  from sklearn.datasets import load_digits
  d = load_digits()
  images = (d.images / 16.0).astype(np.float32)     # (1797, 8, 8)
  order = np.random.default_rng([seed, 99]).permutation(len(images))
  n_test = int(round(len(images) * test_fraction))
  test, train = order[:n_test], order[n_test:]
  return {'train': (images[train], d.target[train].astype(np.int64)),
          'test': (images[test], d.target[test].astype(np.int64))}


# ------------------------------------------------------------------- rendering


def background(rng: np.random.Generator, canvas: int, frames: int,
               noise_std: float) -> np.ndarray:
  """Smooth random colour texture (fixed camera) plus fresh noise per frame.

  -> (T, H, W, 3) float 0..255.
  """
  coarse = rng.uniform(0.0, 110.0, size=(5, 5, 3))
  grid = np.linspace(0, 4, canvas)
  i0 = np.clip(np.floor(grid).astype(int), 0, 3)
  f = (grid - i0)[:, None]
  rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]      # (H, 5, 3)
  tex = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # (H, W, 3)
  noise = rng.normal(0.0, noise_std, size=(frames, canvas, canvas, 3))
  return tex[None] + noise


def render(digit: np.ndarray, centers: np.ndarray, scales: np.ndarray, angles: np.ndarray,
           bg: np.ndarray, color: np.ndarray) -> np.ndarray:
  """Paint `digit` (8, 8) at per-frame pose onto `bg` (T, H, W, 3) -> uint8 (T, H, W, 3).

  Pose: centre (x, y) in pixels, scale (x 8 px), angle in radians; a growing
  angle turns the digit clockwise on screen (y points down). Each output pixel
  samples the digit bilinearly through the inverse similarity transform.
  """
  t, h, w, _ = bg.shape
  ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij')
  dx = xs[None] - centers[:, 0, None, None]                      # (T, H, W)
  dy = ys[None] - centers[:, 1, None, None]
  cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
  s = scales[:, None, None]
  # Inverse rotation, then scale back to digit pixels (centre 4, pixel centres at i + 0.5).
  u = (cos * dx + sin * dy) / s + 4.0 - 0.5                      # column in the digit
  v = (-sin * dx + cos * dy) / s + 4.0 - 0.5                     # row in the digit
  padded = np.pad(digit, 1)                                      # zero border: (10, 10)
  u, v = np.clip(u + 1, 0, 9), np.clip(v + 1, 0, 9)
  u0, v0 = np.minimum(np.floor(u).astype(int), 8), np.minimum(np.floor(v).astype(int), 8)
  fu, fv = u - u0, v - v0
  alpha = (padded[v0, u0] * (1 - fu) * (1 - fv) + padded[v0, u0 + 1] * fu * (1 - fv)
           + padded[v0 + 1, u0] * (1 - fu) * fv + padded[v0 + 1, u0 + 1] * fu * fv)
  alpha = alpha[..., None]                                       # (T, H, W, 1)
  out = bg * (1 - alpha) + color[None, None, None] * alpha
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _color(rng: np.random.Generator) -> np.ndarray:
  c = rng.uniform(150.0, 255.0, size=3)
  c[rng.integers(3)] = 255.0           # always one saturated channel: visible on any texture
  return c


def motion_pose(motion: int, rng: np.random.Generator, cfg: MovingDigitsConfig):
  """Pose trajectory (centres (T, 2), scales (T,), angles (T,)) of the FIRST class of the pair.

  The second class of each pair is this trajectory played backwards (see `motion_clip`).
  """
  t = cfg.num_frames
  steps = np.arange(t, dtype=np.float64)
  c = cfg.canvas
  pair = motion // 2
  tilt = np.deg2rad(rng.uniform(-cfg.static_angle_deg, cfg.static_angle_deg))
  if pair in (0, 1):                   # left (x decreases) / up (y decreases)
    s = rng.uniform(*cfg.translate_scale)
    travel = cfg.step_px * (t - 1)
    lo, hi = 4 * s - 2, c - 4 * s + 2  # the digit may touch the border by 2 px
    start = rng.uniform(min(lo + travel, hi), hi)
    along = start - cfg.step_px * steps
    across = np.full(t, rng.uniform(c / 2 - 4, c / 2 + 4))
    centers = np.stack([along, across], -1) if pair == 0 else np.stack([across, along], -1)
    return centers, np.full(t, s), np.full(t, tilt)
  centre = rng.uniform(c / 2 - 3, c / 2 + 3, size=2)
  centers = np.repeat(centre[None], t, 0)
  if pair == 2:                        # zoom in: the digit grows (geometric steps)
    s0, s1 = rng.uniform(*cfg.zoom_small), rng.uniform(*cfg.zoom_large)
    return centers, s0 * (s1 / s0) ** (steps / (t - 1)), np.full(t, tilt)
  # rotate clockwise: the angle grows by a fixed step, staying within +-limit.
  span = cfg.rotate_deg_per_frame * (t - 1)
  a0 = rng.uniform(-cfg.rotate_limit_deg, cfg.rotate_limit_deg - span)
  angles = np.deg2rad(a0 + cfg.rotate_deg_per_frame * steps)
  return centers, np.full(t, rng.uniform(*cfg.translate_scale)), angles


def motion_clip(digit: np.ndarray, motion: int, rng: np.random.Generator,
                cfg: MovingDigitsConfig) -> np.ndarray:
  """One clip (T, H, W, 3) uint8 of `digit` moving with class `motion`."""
  centers, scales, angles = motion_pose(motion, rng, cfg)
  bg = background(rng, cfg.canvas, cfg.num_frames, cfg.noise_std)
  clip = render(digit, centers, scales, angles, bg, _color(rng))
  if motion % 2 == 1:                  # second class of the pair: the exact time reversal
    clip = clip[::-1].copy()
  return clip


@dataclasses.dataclass(frozen=True)
class Clip:
  name: str
  video: np.ndarray      # (T, H, W, 3) uint8
  motion: int
  digit: int


def clips(split: str, per_class: int, seed: int,
          cfg: MovingDigitsConfig = MovingDigitsConfig()) -> Iterator[Clip]:
  """The clips of a split: `per_class` per motion class, balanced, digits drawn from the
  split's images."""
  images, digits = digit_images(seed, cfg.test_fraction)[split]
  for i in range(per_class * len(MOTIONS)):
    rng = np.random.default_rng([seed, _SPLIT_ID[split], i])
    motion = i % len(MOTIONS)
    k = int(rng.integers(len(images)))
    yield Clip(f'{split}_{i:05d}', motion_clip(images[k], motion, rng, cfg), motion, int(digits[k]))


def static_frames(split: str, count: int, seed: int, step: int = 0,
                  scale: tuple = (1.5, 2.0), max_angle_deg: float = 30.0,
                  cfg: MovingDigitsConfig = MovingDigitsConfig()) -> tuple[np.ndarray, np.ndarray]:
  """Single frames for image pre-training: (count, H, W, 3) uint8 and digit labels (count,).

  `split` 'train' draws from the train images, 'test' from the held-out ones;
  `step` picks a fresh deterministic batch.
  """
  images, digits = digit_images(seed, cfg.test_fraction)['train' if split == 'train' else 'test']
  rng = np.random.default_rng([seed, _SPLIT_ID['pre' + split], step])
  idx = rng.integers(len(images), size=count)
  c = cfg.canvas
  out = np.empty((count, c, c, 3), np.uint8)
  for j, k in enumerate(idx):
    s = rng.uniform(*scale)
    centre = rng.uniform(c / 2 - 3, c / 2 + 3, size=(1, 2))
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg, size=1))
    bg = background(rng, c, 1, cfg.noise_std)
    out[j] = render(images[k], centre, np.array([s]), angle, bg, _color(rng))[0]
  return out, digits[idx]


# ------------------------------------------------------------------ mp4 + lists


def write_mp4(path: str | os.PathLike, video: np.ndarray, fps: int = 8) -> None:
  """(T, H, W, 3) uint8 -> H.264 mp4 (near-lossless, one thread: byte-deterministic)."""
  import av
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width, stream.height = video.shape[2], video.shape[1]
    stream.pix_fmt = 'yuv420p'
    stream.options = {'crf': '4', 'preset': 'veryfast', 'threads': '1'}
    stream.codec_context.thread_count = 1
    for frame in video:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                             format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
  import av
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])


def annotation_path(root: str | os.PathLike, split: str, label_set: str) -> pathlib.Path:
  return pathlib.Path(root) / 'annotations' / f'{split}_{label_set}.txt'


def write_split(root: str | os.PathLike, split: str, per_class: int, seed: int,
                cfg: MovingDigitsConfig = MovingDigitsConfig(), progress: bool = True) -> int:
  """mp4s under ROOT/videos/SPLIT/ and one `path label` list per label set; -> clip count.

  Paths in the lists are relative to ROOT/videos (the `--videos` directory of prepare).
  """
  root = pathlib.Path(root)
  vdir = root / 'videos' / split
  vdir.mkdir(parents=True, exist_ok=True)
  (root / 'annotations').mkdir(parents=True, exist_ok=True)
  lines = {k: [] for k in LABEL_SETS}
  total = per_class * len(MOTIONS)
  bar = _bar(total, f'moving digits {split}') if progress else None
  for clip in clips(split, per_class, seed, cfg):
    write_mp4(vdir / f'{clip.name}.mp4', clip.video, cfg.fps)
    rel = f'{split}/{clip.name}.mp4'
    lines['motion'].append(f'{rel} {clip.motion}')
    lines['appearance'].append(f'{rel} {clip.digit}')
    if bar:
      bar.update(1)
  if bar:
    bar.close()
  for label_set, rows in lines.items():
    annotation_path(root, split, label_set).write_text('\n'.join(rows) + '\n')
  return total


def class_names(label_set: str) -> list[str]:
  return list(MOTIONS) if label_set == 'motion' else [str(d) for d in range(10)]


def tfrecord_dir(root: str | os.PathLike, label_set: str) -> pathlib.Path:
  return pathlib.Path(root) / 'tfrecords' / label_set


def prepare_tfrecords(root: str | os.PathLike, splits: Sequence[str] = SPLITS,
                      label_sets: Sequence[str] = LABEL_SETS, python: str = sys.executable,
                      parallel: int = 2) -> None:
  """Run the real `python -m data_pipelines.prepare` once per (label set, split).

  The clips are tiny, so each command writes in its own process (`--num_workers 0`: no
  spawned writer that would import TensorFlow again) and `parallel` commands run at once.
  """
  root = pathlib.Path(root)
  cmds = []
  for label_set in label_sets:
    names = root / 'annotations' / f'{label_set}_classes.txt'
    names.write_text('\n'.join(class_names(label_set)) + '\n')
    for split in splits:
      # short_side 0: the clips are already the model's 32 px (the default would upscale to 256).
      cmds.append([python, '-m', 'data_pipelines.prepare', '--videos', str(root / 'videos'),
                   '--annotations', str(annotation_path(root, split, label_set)),
                   '--out', str(tfrecord_dir(root, label_set)), '--split', split,
                   '--name', f'moving_digits_{label_set}', '--format', 'list',
                   '--labels', str(names), '--short_side', '0', '--jpeg_quality', '95',
                   '--num_workers', '0'])

  def run(cmd: list[str]) -> int:
    print('$', ' '.join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    codes = list(pool.map(run, cmds))
  failed = [' '.join(c) for c, rc in zip(cmds, codes) if rc]
  if failed:
    raise RuntimeError('data preparation failed:\n  ' + '\n  '.join(failed))


def _bar(total: int, desc: str):
  try:
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='clip', leave=True, mininterval=1.0)
  except ImportError:
    return _PlainBar(total, desc)


class _PlainBar:
  """Progress without tqdm: a line every 10%."""

  def __init__(self, total: int, desc: str):
    self.total, self.desc, self.n, self.t0 = total, desc, 0, time.time()

  def update(self, k: int) -> None:
    before = self.n * 10 // max(self.total, 1)
    self.n += k
    if self.n * 10 // max(self.total, 1) != before or self.n == self.total:
      print(f'{self.desc}: {self.n}/{self.total} ({time.time() - self.t0:.0f} s)', flush=True)

  def close(self) -> None:
    pass


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True)
  p.add_argument('--train_per_class', type=int, default=200)
  p.add_argument('--test_per_class', type=int, default=50)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--tfrecords', action='store_true',
                 help='also run data_pipelines.prepare for both label sets')
  args = p.parse_args(argv)
  write_split(args.out, 'train', args.train_per_class, args.seed)
  write_split(args.out, 'test', args.test_per_class, args.seed)
  if args.tfrecords:
    prepare_tfrecords(args.out)
  print(f'wrote Moving Digits to {args.out}')


if __name__ == '__main__':
  main()
