"""What trains, how fast, and with how much weight decay: the official AIM optimiser.

* Freezing: `optax.multi_transform` with `optax.set_to_zero()` for frozen
  leaves, so they get neither optimiser state nor an update. (`optax.masked`
  alone would pass frozen gradients through unchanged, see
  docs/official_recipe.md#frozen-updates.)
* Parameter groups: mmcv's `DefaultOptimizerConstructor` with
  `paramwise_cfg.custom_keys`: the *longest* key that is a substring of the
  name decides both `lr_mult` and `decay_mult` (default 1). The official
  configs exempt class/positional embeddings and every LayerNorm from weight
  decay; large models add `backbone: lr_mult 0.1`, so `backbone.ln_post` gets
  lr 0.1x and weight decay (docs/official_recipe.md#paramwise).
* Schedule: mmcv `CosineAnnealing(by_epoch=True, min_lr=0)` with a linear
  warm-up by iteration from `warmup_ratio` x the scheduled lr.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from aim_jax import params as P

FROZEN = 'frozen'
Schedule = Callable[[Any], Any]


def make_schedule(cfg: Any, steps_per_epoch: int, total_steps: int) -> Schedule:
  """Learning rate as a function of the (0-based) step, jit-traceable.

  'cosine_epoch' (official):
    lr_e  = min_lr + (lr - min_lr) * (1 + cos(pi * e / E)) / 2, e = step // steps_per_epoch
    lr_it = lr_e * (1 - (1 - it / W) * (1 - warmup_ratio))   for it < W = warmup_epochs * spe
  'cosine': the same with e = step / steps_per_epoch (updated every step).
  'constant': lr (with the same warm-up).
  """
  base, min_lr = float(cfg.lr), float(cfg.min_lr)
  spe = max(int(steps_per_epoch), 1)
  epochs = max(total_steps / spe, 1e-9)
  warmup = int(round(float(cfg.warmup_epochs) * spe))
  ratio = float(cfg.warmup_ratio)
  kind = cfg.schedule
  if kind not in ('cosine_epoch', 'cosine', 'constant'):
    raise ValueError(f"optimizer.schedule {kind!r} is not 'cosine_epoch', 'cosine' or "
                     "'constant'")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == 'constant':
      lr = jnp.full_like(step, base)
    else:
      epoch = jnp.floor(step / spe) if kind == 'cosine_epoch' else step / spe
      lr = min_lr + (base - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * epoch / epochs))
    if warmup > 0:
      factor = 1.0 - (1.0 - step / warmup) * (1.0 - ratio)
      lr = jnp.where(step < warmup, lr * factor, lr)
    return lr

  return schedule


def custom_keys(cfg: Any) -> dict[str, tuple[float, float]]:
  """optimizer.{lr_mults, wd_exempt} -> {key: (lr_mult, decay_mult)} (mmcv custom_keys)."""
  keys: dict[str, list[float]] = {}
  for key in cfg.wd_exempt:
    keys.setdefault(str(key), [1.0, 1.0])[1] = 0.0
  lr_mults = cfg.lr_mults.to_dict() if hasattr(cfg.lr_mults, 'to_dict') else dict(cfg.lr_mults)
  for key, mult in lr_mults.items():
    keys.setdefault(str(key), [1.0, 1.0])[0] = float(mult)
  return {k: (v[0], v[1]) for k, v in keys.items()}


def group_of(name: str, keys: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
  """(lr_mult, decay_mult) of a parameter: the longest key contained in its name wins."""
  for key in sorted(keys, key=len, reverse=True):
    if key in name:
      return keys[key]
  return (1.0, 1.0)


def group_label(lr_mult: float, wd: float) -> str:
  return f'lr{lr_mult:g}_wd{wd:g}'


def param_labels(params: Any, cfg: Any, trainable: Sequence[str] = P.OFFICIAL_TRAINABLE,
                 full_finetune: bool = False) -> tuple[Any, dict[str, tuple[float, float]]]:
  """-> (labels pytree, {label: (lr_mult, weight_decay)}); frozen leaves are FROZEN."""
  mask = P.trainable_mask(params, trainable, full_finetune)
  keys = custom_keys(cfg)
  groups: dict[str, tuple[float, float]] = {}

  def label(path, leaf_mask):
    if not leaf_mask:
      return FROZEN
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    lr_mult, decay_mult = group_of(name, keys)
    wd = float(cfg.weight_decay) * decay_mult
    lab = group_label(lr_mult, wd)
    groups[lab] = (lr_mult, wd)
    return lab

  labels = jax.tree_util.tree_map_with_path(label, mask)
  return labels, groups


def make_optimizer(params: Any, cfg: Any, schedule: Schedule,
                   trainable: Sequence[str] = P.OFFICIAL_TRAINABLE,
                   full_finetune: bool = False) -> tuple[optax.GradientTransformation, Any]:
  """-> (tx, labels). `params` may be abstract (ShapeDtypeStructs): only the tree is used."""
  if cfg.name != 'adamw':
    raise ValueError(f"optimizer.name {cfg.name!r} is not supported (only 'adamw')")
  labels, groups = param_labels(params, cfg, trainable, full_finetune)
  if not groups:
    raise ValueError(f'no parameter matches the trainable patterns {list(trainable)} '
                     '(config field `trainable`)')
  transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
  def scaled(mult: float) -> Schedule:
    return lambda step: schedule(step) * mult

  for lab, (lr_mult, wd) in groups.items():
    transforms[lab] = optax.adamw(scaled(lr_mult), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                  weight_decay=wd)
  tx = optax.multi_transform(transforms, labels)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, labels


def describe_groups(params: Any, labels: Any) -> dict[str, tuple[int, int]]:
  """{label: (tensors, parameters)}, for the start-up log."""
  out: dict[str, list[int]] = {}
  for p, lab in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)):
    entry = out.setdefault(lab, [0, 0])
    entry[0] += 1
    entry[1] += int(math.prod(p.shape))
  return {k: (v[0], v[1]) for k, v in sorted(out.items())}
