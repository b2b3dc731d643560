"""Default data configuration: the one place every data field is defined.

Library code reads these fields with attribute access (never `.get(key, default)`), so a
misspelt override fails loudly. Values follow the official AIM recipe
(docs/official_recipe.md#datasets):
CLIP mean/std on 0..255, short side 256 for training/validation and 224 for testing.
"""

from typing import Optional

import ml_collections

# CLIP normalisation on 0..255 (= CLIP mean/std * 255), as the official configs use.
CLIP_MEAN = (122.769, 116.74, 104.04)
CLIP_STD = (68.493, 66.63, 70.321)


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data config with every field the pipeline reads."""
  c = ml_collections.ConfigDict()
  c.source = 'tfrecord'  # 'tfrecord' | 'tfds' | 'synthetic'
  # Glob patterns of DMVR-layout SequenceExample shards; comma-separated lists allowed.
  c.train_files = ''
  c.val_files = ''
  c.test_files = ''
  # TFDS video dataset (tfds.features.Video + a label feature), e.g. 'ucf101'.
  c.tfds_name = ''
  c.tfds_data_dir = ''
  c.num_classes = 400
  # Temporal sampling: 'dense' (clip_len=num_frames, stride frame_interval) or
  # 'uniform' (TSN-style segments, as SSv2 and Diving-48 use).
  c.num_frames = 8
  c.sampling = 'dense'
  c.frame_interval = 16
  # Spatial.
  c.image_size = 224
  c.train_short_side = 256
  c.test_short_side = 224
  c.area_range = (0.08, 1.0)
  c.aspect_ratio_range = (3 / 4, 4 / 3)
  c.flip_prob = 0.5
  # Extra augmentation (SSv2 recipe: randaugment 4/7, random erasing 0.25; K400-L: colour jitter).
  c.randaugment_n = 0
  c.randaugment_m = 0
  c.random_erasing_prob = 0.0
  c.color_jitter = 0.0
  # Views: V = crops * clips, crop-major then clip.
  c.val_clips = 1
  c.val_crops = 1
  c.test_clips = 3
  c.test_crops = 1
  c.mean = CLIP_MEAN
  c.std = CLIP_STD
  # tf.data knobs.
  c.shuffle_buffer = 256
  c.prefetch = 2
  c.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE
  # tf.data's autotuning of parallelism and buffers (a model thread per iterator). Off: the
  # AUTOTUNE parallelism is the core count, and deleting an iterator no longer waits for
  # the model thread's next wake-up (up to a minute after a long run), which matters for
  # short runs on small hosts (projects/moving_digits/config.py).
  c.autotune = True
  # Training stops with an error naming the bad clips when more than this fraction is skipped.
  c.max_skip_rate = 0.01
  # The skip-rate check starts after this many clips (one bad clip early is not a trend).
  c.skip_rate_min_examples = 1000
  # Deterministic subset of the training records (by key hash), for quick runs.
  c.train_fraction = 1.0
  # 0 = count the records (from the prepare report beside the shards, or by reading them).
  c.num_train_examples = 0
  # Frame indexes beside the shards (data_pipelines/frame_index.py): 'auto' reads only the
  # sampled frames when every shard has an index made for its current size (prepare writes
  # them; `python -m data_pipelines.frame_index` builds them for other shards), else whole
  # records; 'off' always whole records; 'require' fails naming a shard without one.
  c.frame_index = 'auto'
  return c


# Evaluation crops per clip (data.val_crops / data.test_crops) the pipelines implement.
EVAL_CROPS = {1: 'the centre crop', 3: 'three crops along the long side',
              10: 'ten crops: four corners and the centre, each also flipped'}


def views(cfg: ml_collections.ConfigDict, split: str) -> tuple[int, int]:
  """(clips, crops) of an evaluation split, checked: a bad value fails here, naming its field."""
  from aim_jax.errors import ConfigError, is_int   # pylint: disable=g-import-not-at-top
  if split not in ('val', 'test'):
    raise ConfigError(f"eval.split={split!r} must be 'val' or 'test'")
  clips, crops = cfg[f'{split}_clips'], cfg[f'{split}_crops']
  if not is_int(crops) or crops not in EVAL_CROPS:
    raise ConfigError(f'data.{split}_crops={crops!r} is not supported; use '
                      + ', '.join(f'{k} ({v})' for k, v in EVAL_CROPS.items()))
  if not is_int(clips) or clips < 1:
    raise ConfigError(f'data.{split}_clips={clips!r} must be a positive integer')
  return clips, crops


SOURCES = ('tfrecord', 'tfds', 'synthetic')
SAMPLINGS = ('dense', 'uniform')
FRAME_INDEX_MODES = ('auto', 'off', 'require')


def check(cfg: ml_collections.ConfigDict) -> None:
  """Every data field a run reads, in its range: a ConfigError naming the first bad one
  (before anything is written or compiled, whatever the source)."""
  from aim_jax.errors import ConfigError, is_int   # pylint: disable=g-import-not-at-top
  from aim_jax.errors import is_number as number   # pylint: disable=g-import-not-at-top

  def fail(field: str, want: str) -> None:
    raise ConfigError(f'data.{field}={cfg[field]!r} must be {want}')

  for field, allowed in (('source', SOURCES), ('sampling', SAMPLINGS),
                         ('frame_index', FRAME_INDEX_MODES)):
    if cfg[field] not in allowed:
      fail(field, 'one of ' + ', '.join(repr(a) for a in allowed))
  for field in ('num_frames', 'num_classes', 'image_size', 'frame_interval'):
    if not is_int(cfg[field]) or cfg[field] < 1:
      fail(field, 'a positive integer')
  for field in ('train_short_side', 'test_short_side'):
    if not is_int(cfg[field]) or cfg[field] < cfg.image_size:
      fail(field, f'an integer >= data.image_size={cfg.image_size}')
  for field in ('flip_prob', 'random_erasing_prob', 'max_skip_rate'):
    if not (number(cfg[field]) and 0 <= cfg[field] <= 1):
      fail(field, 'in [0, 1]')
  if not (number(cfg.color_jitter) and cfg.color_jitter >= 0):
    fail('color_jitter', '>= 0')
  if not (number(cfg.train_fraction) and 0 < cfg.train_fraction <= 1):
    fail('train_fraction', 'in (0, 1]')
  for field in ('randaugment_n', 'randaugment_m', 'num_train_examples', 'shuffle_buffer',
                'skip_rate_min_examples'):
    if not is_int(cfg[field]) or cfg[field] < 0:
      fail(field, 'an integer >= 0')
  for field, low in (('area_range', 0.0), ('aspect_ratio_range', 0.0)):
    r = tuple(cfg[field])
    if len(r) != 2 or not all(number(v) for v in r) or not low < r[0] <= r[1]:
      fail(field, '(low, high) with 0 < low <= high')
  if not 0 < cfg.area_range[1] <= 1:
    fail('area_range', 'within (0, 1]: fractions of the frame area')
  for field in ('mean', 'std'):
    v = tuple(cfg[field])
    if len(v) != 3 or not all(number(x) for x in v):
      fail(field, 'three numbers (R, G, B)')
  if not all(x > 0 for x in cfg.std):
    fail('std', 'three positive numbers (R, G, B)')
  check_views(cfg)


def check_views(cfg: ml_collections.ConfigDict) -> None:
  """Checks the view fields of both evaluation splits (one-line errors naming the field).
  Training calls it first: evaluation during and after training uses them."""
  for split in ('val', 'test'):
    views(cfg, split)


def process_slot(process_index: Optional[int],
                 process_count: Optional[int]) -> tuple[int, int]:
  """(index, count) of the process a pipeline reads for; None: this JAX process's."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return process_index, process_count
