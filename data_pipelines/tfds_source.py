"""TFDS video data sets (`tfds.features.Video`, e.g. `ucf101`) through the same clip pipeline.

Frames are read still encoded (`tfds.decode.SkipDecoding`), so, as with our TFRecords, the
sampler picks frame indices first and only the sampled JPEGs are decoded. Records are split
across processes by position (`shard`), which sees every example exactly once.

`data.train_fraction` keeps the same deterministic subset rule as the TFRecord source: a
record is kept when the hash bucket of `SOURCE:POSITION` falls below the fraction, where SOURCE
is `tfds_name:split` here (the shard file name there) and POSITION the record's place in the
split's fixed order. The subset is chosen before the split across processes, so it does not
depend on the process count, and `count_examples` counts it.
"""

from typing import Callable, Optional, Tuple

import ml_collections
import tensorflow as tf


def _builder(cfg: ml_collections.ConfigDict):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not cfg.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name (e.g. 'ucf101')")
  return tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir or None)


def split_name(builder, split: str) -> str:
  """Our split -> the TFDS split ('val' is 'validation' where it exists, else 'test')."""
  splits = set(builder.info.splits.keys()) if builder.info.splits else set()
  if split == 'val':
    return 'validation' if 'validation' in splits or not splits else 'test'
  if split in ('train', 'test'):
    return split
  raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


def _fraction(cfg: ml_collections.ConfigDict, split: str) -> float:
  return float(cfg.train_fraction) if split == 'train' else 1.0


def _keep(source: str, index, fraction: float):
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline._keep_mask(tf.constant(source), index, fraction)  # pylint: disable=protected-access


def _records(cfg: ml_collections.ConfigDict, split: str, pi: int, pc: int,
             fraction: float = 1.0) -> tf.data.Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _builder(cfg)
  name = split_name(builder, split)
  ds = builder.as_dataset(split=name, shuffle_files=False,
                          decoders={'video': tfds.decode.SkipDecoding()})
  source = f'{cfg.tfds_name}:{name}'
  ds = ds.enumerate()  # position in the split's fixed order: the subset and key rule
  if fraction < 1.0:
    ds = ds.filter(tf.autograph.experimental.do_not_convert(
        lambda i, ex: _keep(source, i, fraction)))
  if pc > 1:
    ds = ds.shard(pc, pi)

  def convert(i, ex):
    if 'video_id' in ex:
      vid = ex['video_id']
      key = tf.strings.as_string(vid) if vid.dtype != tf.string else vid
    else:
      key = tf.strings.join([source, ':', tf.strings.as_string(i)])
    return {'frames': ex['video'], 'label': tf.cast(ex['label'], tf.int32), 'key': key,
            'file': tf.constant(f'tfds:{cfg.tfds_name}/{name}')}

  return ds.map(tf.autograph.experimental.do_not_convert(convert))


def count_examples(cfg: ml_collections.ConfigDict, split: str) -> int:
  """Videos of `split` (train: those `data.train_fraction` keeps)."""
  builder = _builder(cfg)
  name = split_name(builder, split)
  fraction = _fraction(cfg, split)
  if builder.info.splits and name in builder.info.splits:
    n = builder.info.splits[name].num_examples
    if n:
      if fraction >= 1.0:
        return int(n)
      keep = _keep(f'{cfg.tfds_name}:{name}', tf.range(n, dtype=tf.int64), fraction)
      return int(tf.reduce_sum(tf.cast(keep, tf.int64)))
  return int(_records(cfg, split, 0, 1, fraction).reduce(tf.constant(0, tf.int64),
                                                         lambda c, _: c + 1))


def train_epochs(cfg: ml_collections.ConfigDict, pi: int, pc: int,
                 seed_base) -> Tuple[Callable[[tf.Tensor], tf.data.Dataset], Optional[int]]:
  """(epoch -> records of this process, records per epoch of this process)."""
  del seed_base  # the record shuffle buffer, seeded per epoch, does the shuffling
  total = count_examples(cfg, 'train')
  return ((lambda epoch: _records(cfg, 'train', pi, pc, _fraction(cfg, 'train'))),
          len(range(pi, total, pc)))


def eval_records(cfg: ml_collections.ConfigDict, split: str, pi: int, pc: int) -> tf.data.Dataset:
  return _records(cfg, split, pi, pc)
