r"""Moving Digits ablation (`make demo`): AIM's claim on one CPU in minutes.

  python -m aim_jax.train --config projects/moving_digits/config.py:variant=aim,task=motion \
      --workdir demo_workdir/runs/motion_aim

A 4-layer CLIP-architecture ViT (32 px, patch 8, width 64), pre-trained on
static digit frames by `python -m projects.moving_digits.demo`, is adapted to 8-frame clips:

  head      frozen image model; only ln_post and the head train (adapters off), so no
            gradient flows back through the backbone
  spatial   + spatial adapters
  temporal  + temporal adapters
  aim       + joint adapters: full AIM
  full      full fine-tuning of the image model (no adapters)

Measured (`make demo`, 2 CPU cores) on `task=motion` (8 motions, pairs are time
reversals): `temporal` 91% and `aim` 96% top-1; `head` and `spatial` about 21%
(near chance within each pair: they find the pair, rarely the direction); on
`task=appearance` (the digit) every variant learns the labels.

Arguments (`:key=value,...`): variant, task, root (the demo work directory
holding data/ and pretrained/), steps (0 = the variant's default), batch,
lr (0 = the variant's default), val (1: evaluate the test split at the end of
training; `make demo` passes 0 where `python -m aim_jax.evaluate` follows),
frames (1-8: the model's clip length, sampled uniformly from each 8-frame clip;
the CI demo uses 4).
"""

import ml_collections

from configs import common

VARIANTS = ('head', 'spatial', 'temporal', 'aim', 'full')
TASKS = {'motion': 8, 'appearance': 10}
ADAPTERS = {                       # (enabled, spatial, temporal, joint)
    'head': (False, False, False, False),
    'spatial': (True, True, False, False),
    'temporal': (True, True, True, False),
    'aim': (True, True, True, True),
    'full': (False, False, False, False),
}
# Steps at batch 32, measured on 2 CPU cores: the temporal variants need ~600
# steps to find the direction of a motion (at 400 the loss still sits near ln 2 per
# pair; 600 steps: 95% test top-1 for AIM, 1000 steps: 98%). Every variant of a task
# trains the same number of steps with the same schedule (cosine, one warm-up epoch),
# so the table compares the variants, not their budgets.
STEPS = {
    'motion': {'head': 600, 'spatial': 600, 'temporal': 600, 'aim': 600, 'full': 600},
    'appearance': {'head': 100, 'spatial': 100, 'temporal': 100, 'aim': 100, 'full': 100},
}
# AdamW peak learning rates: adapters and head 3e-3; the whole image model more gently.
LR = {'head': 3e-3, 'spatial': 3e-3, 'temporal': 3e-3, 'aim': 3e-3, 'full': 1e-3}
# The demo backbone; `projects.moving_digits.demo` pre-trains exactly this image encoder.
BACKBONE = dict(backbone='clip', variant='', patch_size=8, width=64, layers=4, heads=4,
                image_size=32, output_dim=0)
NUM_FRAMES = 8
BATCH = 32  # the default `batch` argument


def tfrecord_glob(root: str, task: str, split: str) -> str:
  """The shards `data_pipelines.prepare` writes for one label set and split."""
  return f'{root}/data/tfrecords/{task}/*-{split}.tfrecord-?????-of-?????'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='aim', task='motion', root='demo_workdir', steps=0,
                       batch=BATCH, lr=0.0, val=1, frames=NUM_FRAMES)
  if a.variant not in VARIANTS:
    raise ValueError(f'projects/moving_digits/config.py: variant {a.variant!r} is not one of '
                     f'{VARIANTS}')
  if a.task not in TASKS:
    raise ValueError(f'projects/moving_digits/config.py: task {a.task!r} is not one of '
                     f'{sorted(TASKS)}')
  if not 1 <= a.frames <= NUM_FRAMES:
    raise ValueError(f'projects/moving_digits/config.py: frames={a.frames}, but a clip has '
                     f'{NUM_FRAMES} frames (1 to {NUM_FRAMES})')
  steps = a.steps or STEPS[a.task][a.variant]

  c = common.get_base_config()
  c.model.update(BACKBONE)
  c.model.num_classes = TASKS[a.task]
  c.model.dropout_rate = 0.0
  c.model.drop_path_rate = 0.0
  enabled, spatial, temporal, joint = ADAPTERS[a.variant]
  c.model.adapters.update(dict(enabled=enabled, spatial=spatial, temporal=temporal,
                               joint=joint))
  c.full_finetune = a.variant == 'full'
  if a.variant == 'head':
    # Head only: the temporal embedding (trainable in AIM) sits before the first block, so
    # training it would back-propagate through the whole frozen backbone.
    c.trainable = ['ln_post', 'cls_head']
  c.init_from = f'{a.root}/pretrained'
  common.set_frames(c, a.frames)

  d = c.data
  d.source = 'tfrecord'
  d.train_files = tfrecord_glob(a.root, a.task, 'train')
  d.val_files = tfrecord_glob(a.root, a.task, 'test')
  d.test_files = tfrecord_glob(a.root, a.task, 'test')
  d.num_classes = TASKS[a.task]
  # Clips are exactly 8 frames: uniform sampling takes each frame once, in order (with
  # fewer frames, one per segment: a random one in training, the middle one in evaluation).
  d.sampling = 'uniform'
  d.frame_interval = 1
  d.image_size = 32
  d.train_short_side = 32
  d.test_short_side = 32
  # No spatial augmentation, and never a flip: a flip turns left into right.
  d.area_range = (1.0, 1.0)
  d.aspect_ratio_range = (1.0, 1.0)
  d.flip_prob = 0.0
  d.val_clips = d.val_crops = d.test_clips = d.test_crops = 1
  d.shuffle_buffer = 512
  # Fixed parallelism (the core count) instead of tf.data's autotuning: as fast on 2 cores,
  # and a run's exit does not wait up to a minute for the autotuner's thread.
  d.autotune = False

  c.batch_size = a.batch
  c.total_steps = steps
  c.steps_per_epoch = 50
  c.optimizer.lr = a.lr or LR[a.variant]
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_epochs = 1.0
  c.checkpoint.every_steps = steps
  c.checkpoint.keep = 1
  c.log_every_steps = 25
  c.eval_every_steps = steps if a.val else -1   # one validation at the end, or none
  c.eval.split = 'test'
  c.eval.batch_size = 64
  c.lock()
  return c
