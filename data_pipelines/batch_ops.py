"""Batch-level training options in numpy: label smoothing and mixup (no TensorFlow).

The official SSv2 recipe smooths labels by 0.1; mixup is the usual batch option of video
recipes. Both act on whole batches after the tf.data pipeline, so they can run on the host
next to `make_train_dataset` or be re-expressed in the jitted step with the same formulas.
"""

import numpy as np


def one_hot_targets(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
  """(B,) int -> (B, C) float32: (1 - s) on the label, s / C spread over every class."""
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels outside [0, {num_classes}): {labels.min()}..{labels.max()}')
  targets = np.full((labels.shape[0], num_classes), smoothing / num_classes, np.float32)
  targets[np.arange(labels.shape[0]), labels] += 1.0 - smoothing
  return targets


def mixup(video: np.ndarray, targets: np.ndarray, alpha: float, seed: int, step: int):
  """Mixes each clip with the batch reversed, weight lam ~ Beta(alpha, alpha) per batch.

  Deterministic in (seed, step), so a resumed run mixes the same way. alpha <= 0 is a no-op.
  Returns (video, targets, lam).
  """
  if alpha <= 0:
    return video, targets, 1.0
  lam = float(np.random.default_rng([seed, step]).beta(alpha, alpha))
  mixed = lam * video + (1.0 - lam) * video[::-1]
  return mixed.astype(video.dtype), (lam * targets + (1.0 - lam) * targets[::-1]), lam
