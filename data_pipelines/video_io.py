"""Video files with PyAV (bundled FFmpeg): decoding for preparation and single-file prediction.

`decode_video` yields RGB frames resized to a short side; `load_video_clip` turns one video
file into the evaluation views the model sees (same sampling, resize, crops and
normalisation as `make_eval_dataset`), for `evaluate predict` on a single mp4.
"""

import math
from typing import Iterator, Optional, Tuple

import numpy as np


def short_side_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
  """mmcv rescale for `Resize(-1, short_side)`: `int(x*scale + 0.5)`; 0 keeps the size."""
  if short_side <= 0:
    return height, width
  scale = short_side / min(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def decode_video(path: str, *, short_side: int = 0, fps: float = 0.0,
                 start_s: Optional[float] = None,
                 end_s: Optional[float] = None) -> Iterator[np.ndarray]:
  """Yields (H, W, 3) uint8 RGB frames of `path`.

  Args:
    short_side: resize so the shorter side has this length (0: keep).
    fps: keep frames at this rate by timestamp (0: keep every frame).
    start_s, end_s: keep only frames whose time lies in [start_s, end_s).
  Raises av.error.FFmpegError (or OSError) when the file cannot be opened or decoded.
  """
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError(f'{path}: no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    if start_s and stream.time_base is not None:
      container.seek(int(start_s / stream.time_base), stream=stream)  # lands on a keyframe before
    next_t = None
    for frame in container.decode(stream):
      t = frame.time if frame.time is not None else 0.0
      if start_s is not None and t < start_s:
        continue
      if end_s is not None and t >= end_s:
        break
      if fps > 0:
        if next_t is None:
          next_t = t
        if t + 1e-6 < next_t:
          continue
        next_t += 1.0 / fps
      h, w = short_side_size(frame.height, frame.width, short_side)
      if (h, w) != (frame.height, frame.width):
        frame = frame.reformat(width=w, height=h, format='rgb24', interpolation='BILINEAR')
      yield frame.to_ndarray(format='rgb24')


def load_video_clip(path: str, data_cfg, split: str = 'test') -> np.ndarray:
  """One video file -> float32 (V, T, H, W, 3) normalised evaluation views.

  Decodes every frame with PyAV, resized while decoding to the split's short side (so a long
  high-resolution video stays small in memory), samples frame indices exactly as the eval
  pipeline does for `split` ('val' or 'test': clips, crops, short side), then crops and
  normalises with the same TF ops. V = crops*clips, crop-major then clip. Differences from
  the TFRecord path are only the JPEG round trip and swscale's bilinear resize.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  from data_pipelines import sampling  # pylint: disable=g-import-not-at-top
  short = data_cfg.test_short_side if split == 'test' else data_cfg.train_short_side
  frames = list(decode_video(path, short_side=short))
  if not frames:
    raise ValueError(f'{path}: no frames decoded')
  frames = np.stack(frames)  # (N, H, W, 3) uint8
  clips, _ = input_pipeline._views(data_cfg, split)  # pylint: disable=protected-access
  idx = sampling.eval_indices(frames.shape[0], sampling=data_cfg.sampling,
                              clip_len=data_cfg.num_frames, interval=data_cfg.frame_interval,
                              num_clips=clips)  # (clips, T)
  picked = tf.gather(frames, tf.reshape(idx, [-1]))  # (clips*T, H, W, 3)
  views = input_pipeline.eval_views_from_frames(picked, data_cfg, split=split)
  return np.asarray(views, np.float32)


def video_info(path: str) -> Tuple[int, float, int, int]:
  """(frames, duration seconds, height, width) from the container header (frames may be 0)."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    s = container.streams.video[0]
    dur = float(s.duration * s.time_base) if s.duration and s.time_base else math.nan
    return int(s.frames or 0), dur, s.codec_context.height, s.codec_context.width
