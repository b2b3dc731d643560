"""Video files with PyAV (bundled FFmpeg): decoding for preparation and single-file prediction.

`decode_video` yields RGB frames resized to a short side; `load_video_clip` turns one video
file into the evaluation views the model sees (same sampling, resize, crops and
normalisation as `make_eval_dataset`), for `evaluate predict` on a single mp4.
"""

import dataclasses
import math
from typing import Iterator, Optional, Tuple

from absl import logging
import numpy as np


def short_side_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
  """mmcv rescale for `Resize(-1, short_side)`: `int(x*scale + 0.5)`; 0 keeps the size."""
  if short_side <= 0:
    return height, width
  scale = short_side / min(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclasses.dataclass
class DecodeReport:
  """What a decode got against what the container header states.

  A file cut after its index (an mp4 written with `-movflags +faststart` keeps the index in
  front of the frames, so it still opens) decodes without an error to a short clip:
  threaded decoding hides FFmpeg's errors. Comparing the frames decoded with the frames (or
  duration x rate) the header states is what finds it.
  """
  stated_frames: int = 0           # frames the header states for the stream (0: unknown)
  stated_seconds: float = math.nan  # stream (else container) duration the header states
  rate: float = 0.0                # average frame rate (0: unknown)
  expected: int = 0                # frames the decoded window should hold (0: unknown)
  decoded: int = 0                 # frames decoded in the window (before `fps` resampling)
  last_s: float = math.nan         # time of the last frame decoded

  # Missing frames tolerated (rounding of durations, edit lists): 1 frame or 2%.
  def shortfall(self) -> str:
    """'' when the decode got what the header states, else a one-line reason."""
    missing = self.expected - self.decoded
    if self.expected <= 0 or missing <= max(1, int(0.02 * self.expected)):
      return ''
    stated = (f' of {self.stated_seconds:.2f} s' if math.isfinite(self.stated_seconds) else '')
    upto = f', to {self.last_s:.2f} s{stated}' if math.isfinite(self.last_s) else ''
    return (f'decoded {self.decoded} of the {self.expected} frames the container states'
            f'{upto}: the file is truncated or damaged')


def _stated(container, stream, start_s, end_s, report: DecodeReport):
  """Fills the header facts of `report` and the frames expected in [start_s, end_s)."""
  report.stated_frames = int(stream.frames or 0)
  if stream.duration and stream.time_base:
    report.stated_seconds = float(stream.duration * stream.time_base)
  elif container.duration:
    report.stated_seconds = container.duration / 1e6  # AV_TIME_BASE
  rate = stream.average_rate or stream.guessed_rate
  report.rate = float(rate) if rate else 0.0
  if start_s is None and end_s is None and report.stated_frames > 0:
    report.expected = report.stated_frames
  elif math.isfinite(report.stated_seconds) and report.rate > 0:
    end = report.stated_seconds if end_s is None else min(end_s, report.stated_seconds)
    report.expected = max(0, int(round((end - (start_s or 0.0)) * report.rate)))


def decode_video(path: str, *, short_side: int = 0, fps: float = 0.0,
                 start_s: Optional[float] = None, end_s: Optional[float] = None,
                 report: Optional[DecodeReport] = None) -> Iterator[np.ndarray]:
  """Yields (H, W, 3) uint8 RGB frames of `path`.

  Args:
    short_side: resize so the shorter side has this length (0: keep).
    fps: keep frames at this rate by timestamp (0: keep every frame).
    start_s, end_s: keep only frames whose time lies in [start_s, end_s).
    report: filled with the frames decoded and those the header states (complete once the
      iterator is exhausted); `report.shortfall()` says whether the file came up short.
  Raises av.error.FFmpegError (or OSError) when the file cannot be opened or decoded.
  """
  import av  # pylint: disable=g-import-not-at-top
  report = DecodeReport() if report is None else report
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError(f'{path}: no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    _stated(container, stream, start_s, end_s, report)
    if start_s and stream.time_base is not None:
      container.seek(int(start_s / stream.time_base), stream=stream)  # lands on a keyframe before
    next_t = None
    for frame in container.decode(stream):
      t = frame.time if frame.time is not None else 0.0
      if start_s is not None and t < start_s:
        continue
      if end_s is not None and t >= end_s:
        break
      report.decoded += 1
      report.last_s = t
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
  from data_pipelines import config as config_lib  # pylint: disable=g-import-not-at-top
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  from data_pipelines import sampling  # pylint: disable=g-import-not-at-top
  short = data_cfg.test_short_side if split == 'test' else data_cfg.train_short_side
  report = DecodeReport()
  frames = list(decode_video(path, short_side=short, report=report))
  if not frames:
    raise ValueError(f'{path}: no frames decoded')
  if report.shortfall():
    logging.warning('%s: %s; predicting from the frames decoded', path, report.shortfall())
  frames = np.stack(frames)  # (N, H, W, 3) uint8
  clips, _ = config_lib.views(data_cfg, split)
  idx = sampling.eval_indices(frames.shape[0], sampling=data_cfg.sampling,
                              clip_len=data_cfg.num_frames, interval=data_cfg.frame_interval,
                              num_clips=clips)  # (clips, T)
  picked = tf.gather(frames, tf.reshape(idx, [-1]))  # (clips*T, H, W, 3)
  views = input_pipeline.eval_views_from_frames(picked, data_cfg, split=split)
  return np.asarray(views, np.float32)
