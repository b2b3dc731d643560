r"""Run a checkpoint on one video file, or on a preprocessed clip array.

  python -m aim_jax.predict --checkpoint DIR --video FILE.mp4 [--labels classes.txt] \
      [--top-k 5] [--config configs/k400.py:b16_f8]
  python -m aim_jax.predict --checkpoint DIR --array clip.npy --layout NCTHW --output logits.npy

A video is decoded with PyAV and turned into the views the evaluation of the
test split uses (`data_pipelines.video_io.load_video_clip`: same frame
sampling, short-side resize, crops and normalisation); the per-view softmax
probabilities are averaged (or the logits, eval.average_clips='score') and the
top-k classes printed. The data settings come from --config, else from the
training run's config (a workdir checkpoint), else the data defaults with the
checkpoint's frames, resolution and classes.

--array runs the model on an already preprocessed float array, (N, C, T, H, W)
(the official PyTorch layout, NCTHW) or (N, T, H, W, C) (NTHWC), optionally
with a views axis after N, and saves the raw logits (N, K) or (N, V, K): the
way to compare this implementation with another on identical input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from aim_jax import checkpoints, errors, reports, run_config
from aim_jax.models.aim import average_views

LAYOUTS = ('NCTHW', 'NTHWC')


class VideoReadError(errors.DataError):
  """A video file that cannot be opened, decoded or sampled."""


class Predictor:
  """A checkpoint's model, parameters and the data settings its inputs need."""

  def __init__(self, checkpoint: str, config: Optional[Any] = None, which: str = 'latest'):
    params, ckpt_model, kind = checkpoints.load_checkpoint(checkpoint, which)
    self.model_config = run_config.merge_model_config(
        config.model if config is not None else None, ckpt_model)
    self.data_config = self._data_config(checkpoint, kind, config)
    self.average_clips = config.eval.average_clips if config is not None else 'prob'
    self.model, params, _ = checkpoints.prepare_model(self.model_config, params)
    self.params = jax.device_put(params)
    self._apply = jax.jit(lambda p, x: self.model.apply({'params': p}, x, train=False))

  def _data_config(self, checkpoint: str, kind: str, config: Optional[Any]):
    if config is not None:
      return config.data
    path = epath.Path(checkpoint) / 'config.json'
    blob = json.loads(path.read_text())
    if kind == 'workdir' and 'config' in blob and 'data' in blob['config']:
      return ml_collections.ConfigDict(blob['config']['data'])
    from data_pipelines.config import default_data_config
    data = default_data_config()
    data.num_frames = self.model_config['num_frames']
    data.image_size = self.model_config['image_size']
    data.num_classes = self.model_config['num_classes']
    return data

  @property
  def num_classes(self) -> int:
    return int(self.model_config['num_classes'])

  def clip_shape(self, layout: str = 'NTHWC') -> tuple[int, ...]:
    """One clip's shape in `layout`, without N: (T, S, S, 3) or (3, T, S, S)."""
    t, s = self.model_config['num_frames'], self.model_config['image_size']
    return (t, s, s, 3) if layout == 'NTHWC' else (3, t, s, s)

  def logits(self, video: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(N, T, H, W, C) normalised clips -> (N, K) logits, in chunks of batch_size."""
    want = self.clip_shape()
    if video.ndim != 5 or tuple(video.shape[1:]) != want:
      raise errors.DataError(f'clips of shape {video.shape}; the model takes '
                             f'(N, {", ".join(map(str, want))}) (N, T, H, W, C)')
    out = [np.asarray(self._apply(self.params, jnp.asarray(video[i:i + batch_size], jnp.float32)))
           for i in range(0, len(video), batch_size)]
    return np.concatenate(out)

  def load_video(self, path: str, split: str = 'test') -> np.ndarray:
    """A video file -> (V, T, H, W, 3) normalised views; errors name the file."""
    if not epath.Path(path).exists():
      raise errors.DataError(f'video file {path} does not exist')
    from data_pipelines import video_io
    try:
      clip = video_io.load_video_clip(path, self.data_config, split=split)
    except Exception as e:  # PyAV, TF and sampling errors all mean "cannot use this file".
      first = (str(e).strip().splitlines() or [''])[0]  # TF errors run to many lines
      raise VideoReadError(f'cannot read video {path}: {type(e).__name__}: {first}') from e
    return clip

  def video_scores(self, path: str, split: str = 'test') -> np.ndarray:
    """(K,) averaged view probabilities (or logits in 'score' mode) of one video file."""
    views = self.load_video(path, split)                     # (V, T, H, W, 3)
    logits = self.logits(views)                              # (V, K)
    return np.asarray(average_views(jnp.asarray(logits), views.shape[0],
                                    self.average_clips))[0]


def top_k(scores: np.ndarray, k: int, names: Optional[Sequence[str]] = None) -> list[dict]:
  """Best k classes, highest score first (ties by class index)."""
  order = np.argsort(-scores, kind='stable')[:k]
  return [dict(rank=i + 1, class_index=int(c), class_name=reports.class_name(names, c),
               score=float(scores[c])) for i, c in enumerate(order)]


def to_nthwc(array: np.ndarray, layout: str) -> tuple[np.ndarray, Optional[int]]:
  """NCTHW / NTHWC array, 5-D or 6-D with views after N -> ((N*V, T, H, W, C), V or None)."""
  if layout not in LAYOUTS:
    raise errors.ConfigError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  if array.ndim not in (5, 6):
    raise errors.DataError(f'array of shape {array.shape}: expected 5-D {layout} or 6-D with '
                           f'views (N, V, {layout[1:]})')
  views = array.shape[1] if array.ndim == 6 else None
  if views is not None:
    array = array.reshape((-1,) + array.shape[2:])           # (N*V, ...)
  if layout == 'NCTHW':
    array = array.transpose(0, 2, 3, 4, 1)                  # (N, C, T, H, W) -> (N, T, H, W, C)
  return np.ascontiguousarray(array, np.float32), views


def predict_array(predictor: Predictor, array: np.ndarray, layout: str,
                  batch_size: int = 8) -> np.ndarray:
  """Logits (N, K) of a 5-D array, (N, V, K) of a 6-D one."""
  want = predictor.clip_shape(layout)
  if array.ndim in (5, 6) and tuple(array.shape[-4:]) != want:
    other = [o for o in LAYOUTS if o != layout and tuple(array.shape[-4:]) ==
             predictor.clip_shape(o)]
    dims = ', '.join(map(str, want))
    raise errors.DataError(
        f'array of shape {array.shape}: the model takes (N, {dims}) or (N, V, {dims}) in '
        f'{layout} ({", ".join(layout[1:])})' + (f'; this is the {other[0]} layout: --layout '
                                                  f'{other[0]}' if other else ''))
  n = array.shape[0]
  clips, views = to_nthwc(array, layout)
  logits = predictor.logits(clips, batch_size)
  return logits.reshape(n, views, -1) if views is not None else logits


def format_top_k(path: str, rows: Sequence[dict], mode: str) -> str:
  what = 'probability' if mode == 'prob' else 'mean logit'
  lines = [f'{path}: top-{len(rows)} ({what})']
  lines += [f'{r["rank"]:>3}. {r["score"]:8.4f}  {r["class_name"]}'
            + (f' ({r["class_index"]})' if r['class_name'] != str(r['class_index']) else '')
            for r in rows]
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Optional config (its data and eval settings).',
                                  lock_config=True)
  checkpoints.define_checkpoint_flags()          # --checkpoint, --which, --labels
  for name in ('checkpoint', 'which', 'labels'):   # listed by --help, not only --helpfull
    flags.declare_key_flag(name)
  flags.DEFINE_string('video', '', 'A video file to classify.')
  flags.DEFINE_integer('top_k', 5, 'How many classes to print.')
  flags.DEFINE_alias('top-k', 'top_k')
  flags.DEFINE_string('array', '', 'A preprocessed clip array (.npy) to run instead of a video.')
  flags.DEFINE_enum('layout', 'NCTHW', list(LAYOUTS), 'Layout of --array.')
  flags.DEFINE_string('output', '', 'Where to save: logits (.npy) for --array, top-k (.json) '
                      'for --video.')
  flags.DEFINE_integer('batch_size', 8, 'Clips per forward pass.')
  return flags.FLAGS


def main(argv) -> None:
  from absl import flags
  errors.quiet_library_logs()
  try:
    _predict(flags.FLAGS)
  except (errors.UserError, VideoReadError) as e:
    if errors.show_traceback():
      raise
    raise SystemExit(errors.report(e, 'predict')) from None


def _check_output(output: str, source: str) -> None:
  """--output: not the input itself, and its folder made now (not after the model ran)."""
  out, src = epath.Path(output), epath.Path(source)
  if out.exists() and src.exists() and (str(out) == str(src) or (
      '://' not in output and os.path.samefile(output, source))):
    raise errors.ConfigError(f'--output {output} is the input file itself: choose another path')
  if out.exists() and out.is_dir():
    raise errors.ConfigError(f'--output {output} is a folder: name the file to write')
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(f'--output {output}: cannot make its folder {out.parent} '
                             f'({e.strerror or e})') from None


def _predict(fl) -> None:
  if bool(fl.video) == bool(fl.array):
    raise errors.ConfigError('give exactly one of --video FILE or --array FILE.npy')
  if fl.batch_size < 1:
    raise errors.ConfigError(f'--batch_size={fl.batch_size} must be >= 1')
  if fl.top_k < 1:
    raise errors.ConfigError(f'--top_k={fl.top_k} must be >= 1')
  if fl.output:
    _check_output(fl.output, fl.video or fl.array)
  if fl.video and not epath.Path(fl.video).exists():  # before the checkpoint is loaded
    raise errors.DataError(f'video file {fl.video} does not exist')
  predictor = Predictor(fl.checkpoint, fl.config, fl.which)
  if fl.array:
    if not fl.output:
      raise errors.ConfigError('--array needs --output FILE.npy for the logits')
    if not epath.Path(fl.array).exists():
      raise errors.DataError(f'array file {fl.array} does not exist')
    try:
      array = np.load(fl.array)
      if not isinstance(array, np.ndarray):
        raise ValueError(f'holds a {type(array).__name__}, not one array')
      if array.dtype.kind not in 'fiu':
        raise ValueError(f'holds {array.dtype} values, not numbers')
      if array.dtype.kind == 'f' and not np.isfinite(array).all():
        raise ValueError(f'{int((~np.isfinite(array)).sum())} of {array.size} values are NaN '
                         'or infinite')
      logits = predict_array(predictor, array, fl.layout, fl.batch_size)
    except (ValueError, OSError) as e:          # not a .npy file, or not the model's shape
      raise errors.DataError(f'array file {fl.array}: {e}') from None
    with epath.Path(fl.output).open('wb') as f:
      np.save(f, logits)
    print(f'{fl.array} {fl.layout} -> logits {logits.shape} saved to {fl.output}', flush=True)
    return
  names = reports.read_class_names(fl.labels, predictor.num_classes) if fl.labels else None
  scores = predictor.video_scores(fl.video)   # a DataError names the file (main: one line)
  rows = top_k(scores, min(fl.top_k, predictor.num_classes), names)
  logging.debug('data: %s', predictor.data_config)
  print(format_top_k(fl.video, rows, predictor.average_clips), flush=True)
  if fl.output:
    epath.Path(fl.output).write_text(json.dumps({'video': fl.video, 'top_k': rows}, indent=2))


def run() -> None:
  from absl import app
  _define_flags()
  app.run(main, flags_parser=run_config.flags_parser('predict'))


if __name__ == '__main__':
  run()
