"""`python -m aim_jax.train`: config errors before compiling, init_from, learning,
preemption (SIGKILL resume, SIGTERM save) and the NaN stop."""
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_env
from aim_jax import checkpoints, errors, run_config, train
from aim_jax import params as P
from aim_jax.models.factory import build_encoder, build_model, resolve_model_config
from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cmd(workdir, *overrides):
  return [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py',
          '--workdir', str(workdir), '--config.progress_bar=False', *overrides]


def run_train(workdir, *overrides, check=True):
  out = subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, env=cpu_env(1), capture_output=True,
                       text=True, timeout=900)
  if check and out.returncode:
    raise AssertionError(f'training failed:\n{out.stderr[-4000:]}')
  return out


def _losses(stderr):
  out = {}
  for line in stderr.splitlines():
    if '] step ' in line and ' loss=' in line:
      step = int(line.split('] step ')[1].split('/')[0])
      out[step] = float(line.split(' loss=')[1].split()[0])
  return out


# -- config errors: raised before anything is compiled or written ------------------------
def _unlocked():
  c = tiny.get_config()
  c.unlock()
  return c


def test_model_and_data_share_one_clip_length():
  # configs/common.py makes data.num_frames (and num_classes, image_size) a reference to
  # the model's field: setting either side sets both, so they can never disagree.
  c = _unlocked()
  c.data.num_frames = 8
  assert c.model.num_frames == 8
  c.model.num_frames = 2
  assert c.data.num_frames == 2
  c.model.num_classes, c.data.image_size = 7, 64
  assert (c.data.num_classes, c.model.image_size) == (7, 64)
  run_config.check_training_config(c, process_count=1, dp_size=1)


def test_eval_batch_need_not_fill_the_mesh_only_divide_over_processes():
  # The multi-view engine pads a process's evaluation batch to its devices: 16 on 32 devices
  # (a v5litepod-32, 4 x 8 GPUs) is fine; only the split over processes must be even.
  c = _unlocked()
  c.batch_size, c.eval.batch_size = 32, 16
  run_config.check_training_config(c, process_count=8, dp_size=32)
  c.eval.batch_size = 12
  with pytest.raises(errors.ConfigError, match='eval.batch_size=12 is not divisible by the '
                                               'number of processes 8'):
    run_config.check_training_config(c, process_count=8, dp_size=32)


def test_batch_not_divisible_names_the_field():
  c = _unlocked()
  c.batch_size = 6
  with pytest.raises(errors.ConfigError, match=r'batch_size=6 .*data-parallel size 4'):
    run_config.check_training_config(c, process_count=1, dp_size=4)
  c.batch_size, c.grad_accum_steps = 8, 3
  with pytest.raises(errors.ConfigError, match='grad_accum_steps=3'):
    run_config.check_training_config(c, process_count=1, dp_size=1)


def test_compiler_options_are_parsed_checked_by_xla_and_reach_the_train_step():
  assert run_config.compiler_options(' a=true, b=FALSE,c=3,d=0.5,e=x ,') == dict(
      a=True, b=False, c=3, d=0.5, e='x')
  assert run_config.compiler_options('') == {}
  # Another backend's options are left out (a GPU option never reaches a TPU compiler).
  both = 'xla_gpu_a=true,xla_tpu_b=1,xla_c=x'
  assert run_config.compiler_options(both, 'tpu') == dict(xla_tpu_b=1, xla_c='x')
  assert run_config.compiler_options(both, 'gpu') == dict(xla_gpu_a=True, xla_c='x')
  c = _unlocked()
  run_config.check_training_config(c, process_count=1, dp_size=1)   # the default is taken
  c.compiler_options = 'xla_gpu_enable_dus_accumulator_zero_init_elimination'
  with pytest.raises(errors.ConfigError, match=r"compiler_options: .* is not NAME=VALUE"):
    run_config.check_training_config(c, process_count=1, dp_size=1)
  c.compiler_options = 'xla_no_such_option=true'
  with pytest.raises(errors.ConfigError, match=r"compiler_options=.*XLA refuses them: .*"
                                               r"xla_no_such_option"):
    run_config.check_training_config(c, process_count=1, dp_size=1)
  # The train step is compiled with them: XLA refuses the same option there.
  from aim_jax import sharding, train_state
  setup = train_state.create_train_state(c, sharding.make_mesh(c.mesh), steps_per_epoch=2)
  with pytest.raises(Exception, match='xla_no_such_option'):
    train_state.train_step_fn(setup).lower(*train_state.abstract_train_args(
        setup, sharding.data_parallel_size(setup.mesh))).compile()


def test_resuming_a_workdir_of_another_model_names_the_field(tmp_path):
  c = _unlocked()
  other = resolve_model_config(c.model)
  other['layers'] = 3
  checkpoints.start_run(str(tmp_path), c, other, {})
  (tmp_path / 'frozen').mkdir()
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)     # a saved step: a run to resume
  with pytest.raises(errors.ConfigError, match=r'model.layers=3.*model.layers=2'):
    train.train_and_evaluate(c, str(tmp_path))


def _save_aim(directory, **model_overrides):
  c = _unlocked()
  c.model.update(model_overrides)
  cfg = resolve_model_config(c.model)
  model = build_model(cfg)
  t, s = cfg['num_frames'], cfg['image_size']
  params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, t, s, s, 3))))['params']
  checkpoints.save_params(str(directory), params, cfg)
  return params


def test_init_from_another_architecture_names_the_field(tmp_path):
  _save_aim(tmp_path / 'wide', width=64, heads=4)
  c = _unlocked()
  c.init_from = str(tmp_path / 'wide')
  with pytest.raises(errors.ConfigError, match=r'model.width=64.*model.width=32'):
    train.train_and_evaluate(c, str(tmp_path / 'w'))


def test_init_from_encoder_fills_the_backbone_and_reports_what_stays_at_init(tmp_path):
  c = _unlocked()
  cfg = resolve_model_config(c.model)
  encoder = build_encoder(cfg)
  s = cfg['image_size']
  enc = nn.unbox(encoder.init(jax.random.key(2), jnp.zeros((1, s, s, 3))))['params']
  checkpoints.save_params(str(tmp_path / 'clip'), enc, cfg)
  model = build_model(cfg)
  fresh = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, cfg['num_frames'], s, s, 3))))
  fresh = jax.tree.map(np.asarray, fresh['params'])
  merged, at_init = checkpoints.load_init_from(str(tmp_path / 'clip'), fresh, cfg)
  merged, fresh, enc = P.flatten(merged), P.flatten(fresh), P.flatten(enc)
  for name, value in enc.items():
    np.testing.assert_array_equal(merged[f'backbone/{name}'], value)
  assert at_init and all(('Adapter' in n or 'temporal_embedding' in n or n.startswith('cls_head'))
                         for n in at_init)
  assert 'backbone/temporal_embedding' in at_init
  for name in at_init:
    np.testing.assert_array_equal(merged[name], fresh[name])


def test_init_from_full_aim_takes_every_leaf(tmp_path):
  saved = _save_aim(tmp_path / 'aim')
  cfg = resolve_model_config(_unlocked().model)
  fresh = jax.tree.map(np.zeros_like, saved)
  merged, at_init = checkpoints.load_init_from(str(tmp_path / 'aim'), fresh, cfg)
  assert at_init == []
  for name, value in P.flatten(saved).items():
    np.testing.assert_array_equal(P.flatten(merged)[name], value)


# -- whole runs (subprocesses) -----------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tiny')
  out = run_train(workdir)
  return workdir, out.stderr


@pytest.mark.slow
def test_tiny_config_learns_and_writes_its_workdir(tiny_run):
  workdir, stderr = tiny_run
  losses = _losses(stderr)
  assert losses[10] > 1.4                     # ~ln(5) at the start
  assert losses[max(losses)] < 0.6 * losses[10], losses
  assert 'val top-1' in stderr
  for name in ('config.json', 'versions.json', 'frozen', 'checkpoints', 'best', 'tensorboard'):
    assert (workdir / name).exists(), name
  assert any(p.name.startswith('events.out.tfevents') for p in (workdir / 'tensorboard').iterdir())
  params, model_cfg = checkpoints.restore_params_from_workdir(str(workdir), 'latest')
  best, _ = checkpoints.restore_params_from_workdir(str(workdir), 'best')
  model = build_model(model_cfg)
  s, t = model_cfg['image_size'], model_cfg['num_frames']
  like = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                    jnp.zeros((1, t, s, s, 3))))['params'])
  assert set(P.flatten(params)) == set(P.flatten(like)) == set(P.flatten(best))
  logits = model.apply({'params': params}, np.zeros((2, t, s, s, 3), np.float32))
  assert logits.shape == (2, 5)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_restart_equals_uninterrupted_run(tiny_run, tmp_path):
  reference, _ = tiny_run
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  marker = workdir / 'checkpoints' / '40' / '_CHECKPOINT_METADATA'
  deadline = time.time() + 600
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  out = run_train(workdir)
  resumed = [line for line in out.stderr.splitlines() if 'resuming from' in line]
  assert resumed and not resumed[0].endswith('/120'), resumed
  final, _ = checkpoints.restore_params_from_workdir(str(workdir))
  ref, _ = checkpoints.restore_params_from_workdir(str(reference))
  for name, value in P.flatten(ref).items():
    np.testing.assert_allclose(P.flatten(final)[name], value, rtol=1e-6, atol=1e-7,
                               err_msg=name)


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_the_rerun_equals_uninterrupted_run(tiny_run, tmp_path):
  reference, _ = tiny_run
  workdir = tmp_path / 'term'
  overrides = ('--config.log_every_steps=1', '--config.checkpoint.every_steps=1000')
  proc = subprocess.Popen(_cmd(workdir, *overrides), cwd=ROOT, env=cpu_env(1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if '] step 5/' in line:
      proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  log = ''.join(lines)
  assert proc.returncode == errors.EXIT_PREEMPTED, log[-3000:]
  assert 'stopped by SIGTERM' in log
  manager = checkpoints.TrainCheckpointer(str(workdir), keep=3, async_save=False)
  step = manager.latest_step()
  manager.close()
  assert step is not None and 5 <= step < 120
  assert not (workdir / 'LOCK').exists()
  out = run_train(workdir, *overrides)          # the requeued command: resumes, finishes, exits 0
  assert out.returncode == errors.EXIT_OK
  assert f'resuming from {workdir}/checkpoints/{step}' in out.stderr
  final, _ = checkpoints.restore_params_from_workdir(str(workdir))
  ref, _ = checkpoints.restore_params_from_workdir(str(reference))
  for name, value in P.flatten(ref).items():
    np.testing.assert_allclose(P.flatten(final)[name], value, rtol=1e-6, atol=1e-7,
                               err_msg=name)


@pytest.mark.slow
def test_a_huge_learning_rate_stops_with_exit_3_before_saving_the_bad_state(tmp_path):
  # lr=1e30: the loss of step 1 is finite, the updated parameters' norm is not (it
  # overflows float32). Nothing may be saved; the message says no checkpoint exists.
  workdir = tmp_path / 'nan'
  out = run_train(workdir, '--config.optimizer.lr=1e30', '--config.optimizer.warmup_epochs=0',
                  '--config.checkpoint.every_steps=1', '--config.checkpoint.async_save=False',
                  check=False)
  assert out.returncode == errors.EXIT_NONFINITE, out.stderr[-3000:]
  found = re.search(r'train: NonFiniteLoss: (.*) at step (\d+) ', out.stderr)
  assert found, out.stderr[-3000:]
  bad = int(found.group(2))
  assert 'param_norm is inf' in found.group(1) or 'loss is' in found.group(1), found.group(0)
  manager = checkpoints.TrainCheckpointer(str(workdir), keep=3, async_save=False)
  last = manager.latest_step()
  manager.close()
  if bad == 1:
    assert last is None and 'none: no checkpoint was written' in out.stderr
  else:
    assert last == bad - 1 and f'last good checkpoint is step {last} in' in out.stderr
