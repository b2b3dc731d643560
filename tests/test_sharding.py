"""Sharded training equals single-device training; checkpoints move between meshes.

The whole training runs are subprocesses of `python -m aim_jax.train` on 1, 8 and 2
simulated CPU devices (the device count is fixed when jax is imported); everything
else runs in-process on the 8 CPU devices conftest sets up.
"""
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from conftest import cpu_env
from aim_jax import checkpoints, optim, sharding, train_state
from aim_jax import params as P
from aim_jax.models.factory import build_model, resolve_model_config
from benchmarks import step_benchmark
from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


def run_train(workdir, devices=1, *overrides, check=True):
  env = cpu_env(devices)
  cmd = [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py',
         '--workdir', str(workdir), f'--config.total_steps={STEPS}',
         '--config.checkpoint.every_steps=3', '--config.eval_every_steps=-1',
         '--config.progress_bar=False', '--config.optimizer.lr=0.001',
         '--config.checkpoint.async_save=False', *overrides]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and out.returncode:
    raise AssertionError(f'{cmd} failed:\n{out.stderr[-4000:]}')
  return out


def test_mesh_shape_fills_the_data_axis():
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, model=1))
  assert sharding.mesh_shape(cfg, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match='mesh'):
    sharding.mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=2, model=1)), 8)


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_device')
  run_train(workdir, 1, '--config.mesh.data=1')
  return workdir


def _fresh_params():
  cfg = tiny.get_config()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
  setup = train_state.create_train_state(cfg, mesh)
  return train_state.host_params(train_state.init_params(setup))


def _close(a, b):
  fa, fb = P.flatten(a), P.flatten(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    np.testing.assert_allclose(fa[name], fb[name], rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_data4_fsdp2_mesh_equals_one_device_then_restores_on_two_devices(one_device_run,
                                                                         tmp_path):
  workdir = tmp_path / 'eight'
  out = run_train(workdir, 8, '--config.mesh.data=4', '--config.mesh.fsdp=2')
  assert "'data': 4, 'fsdp': 2" in out.stderr
  ref, _ = checkpoints.restore_params_from_workdir(str(one_device_run))
  eight, _ = checkpoints.restore_params_from_workdir(str(workdir))
  # The frozen weights of the 8-device run are the fresh initialisation (seed 0), built
  # here independently, bit for bit (nothing in training wrote them).
  fresh = P.flatten(_fresh_params())
  frozen = [k for k in fresh if not re.search('|'.join(tiny.get_config().trainable), k)]
  assert frozen
  for name in frozen:
    np.testing.assert_array_equal(P.flatten(eight)[name], fresh[name], err_msg=name)
  _close(eight, ref)

  # Resume the 8-device run's step-3 checkpoint on a 2-device (fsdp=2) mesh.
  shutil.rmtree(workdir / 'checkpoints' / str(STEPS))
  out = run_train(workdir, 2, '--config.mesh.data=1', '--config.mesh.fsdp=2')
  assert 'resuming from' in out.stderr and 'checkpoints/3' in out.stderr
  two, _ = checkpoints.restore_params_from_workdir(str(workdir))
  _close(two, ref)


def test_logical_rules_shard_frozen_weights_over_fsdp_and_moments_like_params():
  # In-process: conftest gives this process 8 CPU devices.
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model = 2, 2, 2
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg = resolve_model_config(cfg.model)
  model = build_model(model_cfg)
  x = jnp.zeros((4, model_cfg['num_frames'], 32, 32, 3))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x)['params'])
  sh = P.flatten(sharding.logical_shardings(boxed, mesh, cfg.logical_axis_rules))
  fc = sh['backbone/resblocks_0/mlp/c_fc/kernel']
  assert fc.spec == PS('fsdp', 'model'), fc
  assert sh['backbone/resblocks_0/attn/qkv/kernel'].spec == PS('fsdp', None, 'model', None)
  assert sh['backbone/resblocks_0/S_Adapter/D_fc1/kernel'].spec == PS('fsdp', None)
  assert sh['cls_head/fc_cls/bias'].spec == PS(None)
  # 'kv' (head dim 16) over 'model' is dropped only when it does not divide: here it divides.
  replicate = [r if r[0] != 'embed' else ('embed', None) for r in cfg.logical_axis_rules]
  rep = P.flatten(sharding.logical_shardings(boxed, mesh, replicate))
  assert rep['backbone/conv1/kernel'].spec == PS(None, None, None, None)
  params = nn.unbox(boxed)
  sched = optim.make_schedule(cfg.optimizer, 10, 100)
  tx, _ = optim.make_optimizer(params, cfg.optimizer, sched, list(cfg.trainable))
  opt = jax.eval_shape(tx.init, params)
  param_sh = sharding.logical_shardings(boxed, mesh, cfg.logical_axis_rules)
  opt_sh = sharding.like_params(param_sh, opt, mesh)
  specs = [(jax.tree_util.keystr(p), s.spec)
           for p, s in jax.tree_util.tree_flatten_with_path(opt_sh)[0]]
  mu = [s for k, s in specs if "mu" in k and "S_Adapter']['D_fc1']['kernel" in k]
  assert mu and all(s == PS('fsdp', None) for s in mu), specs


def test_activation_constraints_are_in_the_step_traced_under_the_global_mesh():
  # Under sharding.mesh_context the model's nn.with_logical_constraint calls become
  # sharding annotations of the (data=4, fsdp=2) mesh; with the rules alone (no global
  # mesh) flax drops them. The eval logits do not change.
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model = 4, 2, 1
  b = step_benchmark.build(cfg, 8, 'train')
  batch = {'video': b['video'], 'label': b['labels']}
  with sharding.mesh_context(b['mesh'], b['rules']):
    under_mesh = b['step'].lower(b['state'], batch).as_text()
  with nn.logical_axis_rules(b['rules']):                 # rules without a global mesh
    rules_only = b['step'].lower(b['state'], batch).as_text()
  def constraints(text):
    # Shardy: sdy.sharding_constraint %x <@mesh, [{"data", "fsdp"}, {}, {}, {}]> : tensor<...>
    return re.findall(r'sharding_constraint %\S+ <@\w+, (\[.*?\])> : tensor<([^>]*)>', text)
  got = constraints(under_mesh)
  assert constraints(rules_only) == [], constraints(rules_only)[:3]
  # (B, T, L, D) = (8, 4, 17, 32) after each block and the MLP hidden (..., 128) over 'model'.
  assert ('[{"data", "fsdp"}, {}, {}, {}]', '8x4x17x32xf32') in got, got
  assert ('[{"data", "fsdp"}, {}, {}, {"model"}]', '8x4x17x128xf32') in got, got
  e = step_benchmark.build(cfg, 8, 'eval')
  with sharding.mesh_context(e['mesh'], e['rules']):
    sharded = np.asarray(e['step'](e['params'], e['video']))
  plain = np.asarray(jax.jit(lambda p, v: e['step'](p, v))(e['params'], e['video']))
  np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-5)


def test_a_train_step_never_changes_a_frozen_weight():
  # 8 devices, fsdp=2: two real steps, then every frozen leaf is bit-identical to before
  # and every trainable leaf has moved.
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model = 4, 2, 1
  b = step_benchmark.build(cfg, 8, 'train')
  before = P.flatten(jax.tree.map(np.asarray, jax.device_get(b['state']['params'])))
  state = b['state']
  batch = {'video': b['video'], 'label': b['labels']}
  with sharding.mesh_context(b['mesh'], b['rules']):
    for _ in range(2):
      state, _ = b['step'](state, batch)
  after = P.flatten(jax.tree.map(np.asarray, jax.device_get(state['params'])))
  trainable = P.flatten(P.trainable_mask(before and P.unflatten(before), list(cfg.trainable)))
  frozen = [k for k, v in trainable.items() if not v]
  assert frozen and len(frozen) < len(before)
  chex.assert_trees_all_equal({k: after[k] for k in frozen}, {k: before[k] for k in frozen})
  moved = [k for k, v in trainable.items() if v and not np.array_equal(after[k], before[k])]
  assert len(moved) == sum(trainable.values()), {k for k, v in trainable.items() if v} - set(moved)
