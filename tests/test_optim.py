"""The optimiser trains exactly what AIM trains, with the official groups and schedule."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aim_jax import optim, steps
from aim_jax import params as P
from aim_jax.models.factory import build_model, resolve_model_config
from configs import common, tiny


def _tiny_params(seed=0):
  cfg = tiny.get_config()
  model_cfg = resolve_model_config(cfg.model)
  model = build_model(model_cfg)
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, t, s, s, 3)), train=False))
  return cfg, model_cfg, model, params['params']


def _opt_cfg(**kw):
  c = common.get_base_config().optimizer
  c.update(kw)
  return c


def test_schedule_is_epochwise_cosine_with_linear_warmup_from_a_tenth():
  cfg = _opt_cfg(lr=1.0, warmup_epochs=2.5, warmup_ratio=0.1, schedule='cosine_epoch')
  lr = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)
  cosine = lambda e: 0.5 * (1 + math.cos(math.pi * e / 10))
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(12)) == pytest.approx(cosine(1) * (1 - (1 - 12 / 25) * 0.9), rel=1e-6)
  assert float(lr(25)) == pytest.approx(cosine(2), rel=1e-6)
  # Constant within an epoch (mmcv by_epoch=True), updated at its first iteration.
  assert float(lr(29)) == float(lr(25))
  assert float(lr(30)) == pytest.approx(cosine(3), rel=1e-6)
  assert float(lr(99)) == pytest.approx(cosine(9), rel=1e-6)


def test_per_step_cosine_differs_within_an_epoch():
  lr = optim.make_schedule(_opt_cfg(lr=1.0, warmup_epochs=0, schedule='cosine'), 10, 100)
  assert float(lr(25)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2.5 / 10)), rel=1e-6)


def test_official_groups_base_model():
  _, _, _, params = _tiny_params()
  labels, groups = optim.param_labels(params, _opt_cfg())
  flat = P.flatten(labels)
  # Only ln_post among the trainable leaves is exempt from weight decay
  # (docs/official_recipe.md#paramwise).
  assert flat['backbone/ln_post/scale'] == flat['backbone/ln_post/bias'] == 'lr1_wd0'
  assert flat['backbone/temporal_embedding'] == 'lr1_wd0.05'
  assert flat['backbone/resblocks_0/S_Adapter/D_fc1/bias'] == 'lr1_wd0.05'
  assert flat['cls_head/fc_cls/bias'] == 'lr1_wd0.05'
  assert flat['backbone/resblocks_0/attn/qkv/kernel'] == optim.FROZEN
  assert flat['backbone/conv1/kernel'] == optim.FROZEN
  assert set(groups) == {'lr1_wd0', 'lr1_wd0.05'}


def test_large_model_backbone_lr_mult_wins_over_ln_post_exemption():
  _, _, _, params = _tiny_params()
  cfg = _opt_cfg(lr_mults=ml_collections.ConfigDict({'backbone': 0.1}))
  flat = P.flatten(optim.param_labels(params, cfg)[0])
  # 'backbone' (8 chars) is longer than 'ln_post' (7): mmcv applies its multipliers only.
  assert flat['backbone/ln_post/scale'] == 'lr0.1_wd0.05'
  assert flat['backbone/resblocks_1/MLP_Adapter/D_fc2/kernel'] == 'lr0.1_wd0.05'
  assert flat['cls_head/fc_cls/kernel'] == 'lr1_wd0.05'


def test_full_finetune_trains_everything_with_the_exemptions():
  _, _, _, params = _tiny_params()
  flat = P.flatten(optim.param_labels(params, _opt_cfg(), full_finetune=True)[0])
  assert optim.FROZEN not in flat.values()
  assert flat['backbone/resblocks_0/ln_1/scale'] == 'lr1_wd0'
  assert flat['backbone/positional_embedding'] == 'lr1_wd0'
  assert flat['backbone/resblocks_0/mlp/c_fc/kernel'] == 'lr1_wd0.05'


def _run_steps(n=3):
  cfg, model_cfg, model, params = _tiny_params()
  mask = P.trainable_mask(params, list(cfg.trainable))
  trainable = steps.trainable_names(mask)
  schedule = optim.make_schedule(cfg.optimizer, 10, 100)
  tx, _ = optim.make_optimizer(params, cfg.optimizer, schedule, list(cfg.trainable))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, trainable=trainable, seed=0,
      num_classes=model_cfg['num_classes'], schedule=schedule))
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  rng = np.random.default_rng(0)
  start = jax.tree.map(np.array, params)
  for _ in range(n):
    batch = {'video': rng.standard_normal((4, t, s, s, 3)).astype(np.float32),
             'label': rng.integers(0, model_cfg['num_classes'], 4).astype(np.int32)}
    state, metrics = step(state, batch)
  return start, state, trainable, metrics


def test_frozen_params_bit_identical_and_aim_params_change():
  start, state, trainable, metrics = _run_steps()
  before, after = P.flatten(start), P.flatten(jax.device_get(state['params']))
  for name in before:
    same = np.array_equal(before[name], after[name])
    if name in trainable:
      continue
    assert same, f'frozen {name} changed'
  changed = {n for n in trainable if not np.array_equal(before[n], after[n])}
  for part in ('S_Adapter', 'T_Adapter', 'MLP_Adapter', 'temporal_embedding', 'ln_post',
               'cls_head'):
    assert any(part in n for n in changed), f'no {part} parameter changed'
  assert int(state['step']) == 3 and np.isfinite(float(metrics['loss']))


def test_frozen_params_have_no_optimizer_state():
  start, state, trainable, _ = _run_steps(1)
  moments = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if 'mu' in keys or 'nu' in keys:
      which = 'mu' if 'mu' in keys else 'nu'
      name = '/'.join(keys[keys.index(which) + 1:])
      moments.setdefault(which, set()).add(name)
  assert moments['mu'] == moments['nu'] == set(trainable)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state['opt_state']))
  n_train = sum(v.size for k, v in P.flatten(start).items() if k in trainable)
  labels = optim.param_labels(start, tiny.get_config().optimizer)[0]
  counts = len(set(P.flatten(labels).values())) - 1
  # mu and nu, plus two step counts per group (Adam's and the schedule's).
  assert n_state == 2 * n_train + 2 * counts


def test_no_trainable_match_is_an_error_naming_the_field():
  _, _, _, params = _tiny_params()
  sched = optim.make_schedule(_opt_cfg(), 10, 100)
  with pytest.raises(ValueError, match='trainable'):
    optim.make_optimizer(params, _opt_cfg(), sched, trainable=['NoSuchParameter'])


def test_gradient_accumulation_matches_one_large_batch():
  cfg, model_cfg, _, params = _tiny_params()
  model_cfg = dict(model_cfg, drop_path_rate=0.0, dropout_rate=0.0)
  model = build_model(model_cfg)
  mask = P.trainable_mask(params, list(cfg.trainable))
  schedule = optim.make_schedule(cfg.optimizer, 10, 100)
  tx, _ = optim.make_optimizer(params, cfg.optimizer, schedule, list(cfg.trainable))
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  rng = np.random.default_rng(1)
  batch = {'video': rng.standard_normal((8, t, s, s, 3)).astype(np.float32),
           'label': rng.integers(0, 5, 8).astype(np.int32)}
  out = {}
  for accum in (1, 4):
    state = {'step': jnp.ones((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    _, out[accum] = jax.jit(functools.partial(
        steps.train_step, model=model, tx=tx, trainable=steps.trainable_names(mask), seed=0,
        num_classes=5, accum_steps=accum))(state, batch)
  for key in ('loss', 'grad_norm', 'accuracy'):
    np.testing.assert_allclose(out[4][key], out[1][key], rtol=2e-5, err_msg=key)
