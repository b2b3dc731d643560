"""Every training field with its default, and the helpers paper configs share.

A config file exposes `get_config(arg)`; `arg` is the text after ':' in
`--config configs/k400.py:b16_f8` (big_vision's convention). Fields are
overridden on the command line with `--config.FIELD=VALUE`.

Defaults are the official recipe (AIM, ICLR 2023; taoyang1122/adapt-image-models
configs/recognition/vit/vitclip_*): AdamW 3e-4, wd 0.05 with mmcv paramwise
exemptions, global batch 64, epoch-wise cosine with 2.5 warm-up epochs from
0.1x, eval every few epochs. docs/recipes.md lists every row, its sources and
what differs from the official files; tests/test_paper_rows.py pins them.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from aim_jax.models.factory import default_model_config
from aim_jax.params import OFFICIAL_TRAINABLE

# mmcv `paramwise_cfg.custom_keys` of every vitclip config: these get decay_mult 0.
OFFICIAL_WD_EXEMPT = ('class_embedding', 'positional_embedding', 'ln_1', 'ln_2', 'ln_pre',
                      'ln_post')

# Logical parameter/activation axis -> mesh axes. 'embed' over fsdp shards the
# frozen backbone (and everything else) across the fsdp axis; set it to None to
# replicate. 'mlp'/'heads' over 'model' is tensor parallelism.
DEFAULT_AXIS_RULES = (
    ('activation_batch', ('data', 'fsdp')),
    ('activation_embed', None),
    ('activation_mlp', 'model'),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('adapter', None),
    ('classes', None),
    ('layers', None),
)


def default_data_config() -> ml_collections.ConfigDict:
  from data_pipelines.config import default_data_config as data_defaults
  return data_defaults()


_BOOLS = {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}

# Set by the model, read by the data pipeline: one value each (see get_base_config).
MODEL_OWNED_DATA_FIELDS = ('num_frames', 'num_classes', 'image_size')


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """'row=b16_f8,frames=16' or a bare 'b16_f8' (the first field) -> typed values.

  `spec` gives each field's default; its type types the parsed value.
  """
  out = ml_collections.ConfigDict(spec)
  if not arg:
    return out
  first = next(iter(spec)) if spec else None
  for part in arg.split(','):
    if not part:
      continue
    key, eq, value = part.partition('=')
    if not eq:
      key, value = first, part
    if key not in spec:
      raise KeyError(f'config argument {key!r} is not one of {sorted(spec)}')
    default = spec[key]
    if isinstance(default, bool):
      if value.lower() not in _BOOLS:
        raise ValueError(f'config argument {key}={value!r} is not a boolean '
                         f'(one of {", ".join(sorted(_BOOLS))})')
      out[key] = _BOOLS[value.lower()]
    elif isinstance(default, (int, float, str)):
      out[key] = type(default)(value)
    else:
      out[key] = value
  return out


def get_base_config() -> ml_collections.ConfigDict:
  """Every field of a training run. Paper configs override a few of these."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(default_model_config())
  c.model.variant = 'B/16'
  c.data = default_data_config()
  # The clip length, class count and input size belong to the model; the data config
  # holds references to them, so setting either side (`--config.model.num_frames=16`
  # or `--config.data.num_frames=16`) sets both, and they can never disagree.
  for field in MODEL_OWNED_DATA_FIELDS:
    c.data[field] = c.model.get_ref(field)
  c.seed = 0
  c.batch_size = 64                 # global: 8 videos x 8 GPUs (official README)
  c.total_epochs = 30.0
  c.total_steps = 0                 # 0 = total_epochs * steps_per_epoch
  c.steps_per_epoch = 0             # 0 = data.num_train_examples (or counted) // batch_size

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 3e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.warmup_epochs = 2.5
  c.optimizer.warmup_ratio = 0.1    # warm-up starts at 0.1x the scheduled lr
  c.optimizer.min_lr = 0.0
  # 'cosine_epoch': mmcv CosineAnnealing(by_epoch=True), the official schedule;
  # 'cosine': the same curve updated every step; 'constant'.
  c.optimizer.schedule = 'cosine_epoch'
  c.optimizer.grad_clip_norm = 0.0  # 0 = none (official: no clipping)
  # mmcv paramwise custom_keys: substring of the name -> lr_mult / decay_mult 0.
  # The longest matching key decides both multipliers (mmcv's rule).
  c.optimizer.lr_mults = ml_collections.ConfigDict()
  c.optimizer.wd_exempt = OFFICIAL_WD_EXEMPT

  c.trainable = OFFICIAL_TRAINABLE   # regexes searched in '/'-joined parameter names
  c.full_finetune = False
  c.init_from = ''                   # a parameter checkpoint (aim_jax.checkpoints)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1 = every device not used by fsdp/model
  c.mesh.fsdp = 1
  c.mesh.model = 1
  c.logical_axis_rules = DEFAULT_AXIS_RULES
  c.grad_accum_steps = 1
  # XLA options of the compiled train step, 'NAME=VALUE,...' ('' = XLA's defaults).
  # The default lets XLA's GPU compiler skip zero-filling the per-layer stacks that a
  # scanned model (scan_layers) keeps for the backward pass: every slot is written
  # before it is read, which XLA checks. L/14 on one H200: -16 ms of a 366 ms step
  # (BENCHMARKS.md). It also keeps XLA from rewriting a cuBLAS product that feeds such a
  # stack into a 'dynamic slice fusion', which computes that product twice (once into the
  # stack, once for its other user): +21 ms on the scanned L/14 step where the autotuner
  # picks cuBLAS. Another backend's options (xla_gpu_* on a TPU) are left out.
  c.compiler_options = ('xla_gpu_enable_dus_accumulator_zero_init_elimination=true,'
                        'xla_gpu_enable_dynamic_slice_fusion=false')
  c.device_prefetch = 2              # batches placed on the devices ahead (0 = in the loop)
  # Compiled steps kept between runs (JAX's persistent compilation cache, aim_jax/compile_cache.py):
  # a restart, a resume or another run of the same program loads its executables instead of
  # compiling them again. '' = off; JAX_COMPILATION_CACHE_DIR, when set, takes precedence.
  c.compilation_cache_dir = '~/.cache/aim_jax/xla'

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_best = True
  c.checkpoint.async_save = True

  c.log_every_steps = 50
  c.eval_every_steps = 0             # 0 = every 5 epochs (official interval); -1 = never
  c.progress_bar = True
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.average_clips = 'prob'
  c.eval.split = 'val'
  c.eval.batch_size = 16             # global, videos (each with all its views)
  return c


def set_backbone(c: ml_collections.ConfigDict, backbone: str,
                 backbone_lr_mult: float = 1.0) -> None:
  """'b16' | 'l14': CLIP ViT-B/16 or ViT-L/14.

  `backbone_lr_mult` is mmcv's paramwise `{'backbone': lr_mult}`. Only two
  official files set it (0.1): vitclip_large_k400.py and vitclip_large_sthv2.py;
  the K700 and Diving-48 large files train the L/14 adapters at the base lr.
  'backbone' is the longest custom key, so with it backbone.ln_post also gets
  the 0.1x lr and keeps weight decay (mmcv's longest-key rule).
  """
  if backbone == 'b16':
    c.model.variant = 'B/16'
  elif backbone == 'l14':
    c.model.variant = 'L/14'
    # nn.scan over the 24 blocks: one block compiled instead of 24 (CPU, one L/14 train
    # step: 21 s instead of 255 s; BENCHMARKS.md). Same numbers; parameter checkpoints
    # stay in the loop layout.
    c.model.scan_layers = True
  else:
    raise ValueError(f"backbone {backbone!r} is not 'b16' or 'l14'")
  if backbone_lr_mult != 1.0:
    c.optimizer.lr_mults = ml_collections.ConfigDict({'backbone': backbone_lr_mult})


def set_frames(c: ml_collections.ConfigDict, frames: int) -> None:
  """The clip length (model.num_frames; data.num_frames refers to it)."""
  c.model.num_frames = frames


def split_row(row: str) -> tuple[str, int]:
  """'b16_f8' -> ('b16', 8)."""
  backbone, _, frames = row.partition('_f')
  if not frames.isdigit():
    raise ValueError(f"config row {row!r} is not BACKBONE_fFRAMES, e.g. 'b16_f8'")
  return backbone, int(frames)
