"""Synthetic videos (`data.source='synthetic'`) in NumPy: smoke runs without TensorFlow.

Each clip is Gaussian noise around a mean set by its label, so a model can learn the
labels (configs/tiny.py's loss falls from ln 5 to well below 1 in 120 steps). A clip is a
function of (seed, process, position) alone, so a resumed run reads the same clips as an
uninterrupted one, and every process reads its own. Evaluation splits are fixed
(`SIZES`), split between processes by position like records. Same interface as
`data_pipelines.input_pipeline` (`count_examples`, `make_train_dataset`,
`make_eval_dataset`); `data_pipelines.for_source` picks the module, so a synthetic run
never imports TensorFlow (the trainer starts ~2 s sooner, and runs where TF is absent).
"""

from typing import Dict, Iterator, Optional

import ml_collections
import numpy as np

from data_pipelines import config as config_lib

# Videos per split. Training is endless; `data.num_train_examples` sets its epoch size.
SIZES = {'train': 256, 'val': 32, 'test': 32}
_EVAL_STREAM = 10_007           # the evaluation clips' seed, fixed (not the run's seed)
_U64 = (1 << 64) - 1


def count_examples(data_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Videos of a split (over all processes)."""
  if split == 'train' and data_cfg.num_train_examples:
    return int(data_cfg.num_train_examples)
  if split not in SIZES:
    raise ValueError(f"split must be one of {sorted(SIZES)}, got {split!r}")
  return SIZES[split]


def clip(data_cfg: ml_collections.ConfigDict, key: tuple[int, ...],
         views: int) -> tuple[np.ndarray, int]:
  """(video f32 (views, T, S, S, 3), label) of the clip with this key."""
  rng = np.random.default_rng([int(k) & _U64 for k in key])
  n, s = data_cfg.num_classes, data_cfg.image_size
  label = int(rng.integers(n))
  noise = rng.standard_normal((views, data_cfg.num_frames, s, s, 3), dtype=np.float32)
  shift = np.float32(label / max(n - 1, 1) * 2.0 - 1.0)
  return noise * np.float32(0.5) + shift, label


def make_train_dataset(data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless {'video': f32 (B,T,S,S,3), 'label': i32 (B,)}; B per process, from `start_step`."""
  config_lib.check_views(data_cfg)
  pi, _ = config_lib.process_slot(process_index, process_count)

  def batches():
    i = start_step * batch_size
    while True:
      clips = [clip(data_cfg, (seed, pi, j), 1) for j in range(i, i + batch_size)]
      i += batch_size
      yield {'video': np.stack([v[0] for v, _ in clips]),
             'label': np.array([label for _, label in clips], np.int32)}

  return batches()


def make_eval_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, batch_size: int,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """{'video': f32 (B,V,T,S,S,3), 'label': i32 (B,), 'key': bytes (B,)}, once over the split;
  process pi of pc reads the videos at positions pi, pi + pc, ..."""
  clips, crops = config_lib.views(data_cfg, split)
  pi, pc = config_lib.process_slot(process_index, process_count)
  positions = list(range(pi, count_examples(data_cfg, split), pc))
  stream = ['val', 'test'].index(split)

  def batches():
    for b in range(0, len(positions), batch_size):
      chunk = positions[b:b + batch_size]
      made = [clip(data_cfg, (_EVAL_STREAM, stream, j), clips * crops) for j in chunk]
      yield {'video': np.stack([v for v, _ in made]),
             'label': np.array([label for _, label in made], np.int32),
             'key': np.array([f'synthetic-{j}'.encode() for j in chunk], object)}

  return batches()
