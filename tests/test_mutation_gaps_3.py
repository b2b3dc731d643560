"""Third round of mutation testing (training loop, workdir checkpoints, TensorBoard scalars,
evaluation reports): each test pins documented behaviour (docs/training.md, the module and
function doc strings) that a plausible refactoring mistake could change without another test
failing. Expectations come from arithmetic or the documented rule, not from the code's own
output."""

import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aim_jax import checkpoints, errors, run_config
from aim_jax import params as P
from aim_jax.models.factory import build_model
from configs import tiny


def _tiny_config(**kw):
  c = tiny.get_config()
  c.unlock()
  c.progress_bar = False
  for k, v in kw.items():
    target, name = c, k.split('.')
    for part in name[:-1]:
      target = target[part]
    target[name[-1]] = v
  return c


def _aim_params(model_cfg, seed):
  model = build_model(model_cfg)
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  params = model.init(jax.random.key(seed), jnp.zeros((1, t, s, s, 3)))
  return jax.tree.map(np.asarray, nn.unbox(params)['params'])


# ----- init_from ----------------------------------------------------------------------------

def test_init_from_an_aim_model_of_another_class_count_leaves_only_the_head_at_init(tmp_path):
  """load_init_from: 'A head of another class count is left at init'; every other leaf of a
  full AIM checkpoint is taken (num_classes is no architecture field: check_init_from passes)."""
  cfg = run_config.resolve_model(_tiny_config().model)
  other = run_config.resolve_model(_tiny_config(**{'model.num_classes': 7}).model)
  saved = _aim_params(other, seed=1)
  checkpoints.save_params(str(tmp_path / 'k7'), saved, other)
  checkpoints.check_init_from(str(tmp_path / 'k7'), cfg)
  fresh = _aim_params(cfg, seed=0)
  merged, at_init = checkpoints.load_init_from(str(tmp_path / 'k7'), fresh, cfg)
  assert sorted(at_init) == ['cls_head/fc_cls/bias', 'cls_head/fc_cls/kernel']
  merged, fresh, saved = P.flatten(merged), P.flatten(fresh), P.flatten(saved)
  assert merged['cls_head/fc_cls/kernel'].shape == (32, 5)
  for name, value in merged.items():
    np.testing.assert_array_equal(value, fresh[name] if name in at_init else saved[name],
                                  err_msg=name)


# ----- the workdir's identity ---------------------------------------------------------------

def _workdir_with_step(path, sub, c):
  checkpoints.start_run(str(path), c, run_config.resolve_model(c.model), {})
  (path / sub / '20').mkdir(parents=True)          # a finished step: a run to resume


def test_a_workdir_holding_only_a_best_step_still_binds_its_config(tmp_path):
  """saved_steps: 'Steps a run finished saving in WORKDIR/checkpoints and WORKDIR/best'. A
  step in best/ alone is a saved step: a resume with another batch size is refused and
  config.json is kept (it is only replaced after a start that saved no step)."""
  c = _tiny_config()
  _workdir_with_step(tmp_path, 'best', c)
  saved = (tmp_path / 'config.json').read_bytes()
  assert checkpoints.saved_steps(str(tmp_path)) == [20]
  c.batch_size = 16
  with pytest.raises(errors.ConfigError, match=r'changed: batch_size: 8 -> 16'):
    checkpoints.start_run(str(tmp_path), c, run_config.resolve_model(c.model), {})
  assert (tmp_path / 'config.json').read_bytes() == saved


def test_resuming_with_another_class_count_is_refused_even_when_changes_are_recorded(tmp_path):
  """start_run: a resume of another model ('use a new workdir to train another model') is
  refused naming the field; --on_config_change=record only covers a changed recipe (a head
  of another shape cannot restore the saved steps)."""
  c = _tiny_config()
  _workdir_with_step(tmp_path, 'checkpoints', c)
  c.model.num_classes = 7
  with pytest.raises(errors.ConfigError, match=r'model.num_classes=5, the config has '
                                               r'model.num_classes=7'):
    checkpoints.start_run(str(tmp_path), c, run_config.resolve_model(c.model), {},
                          on_config_change='record')
  assert not (tmp_path / 'config_changes.jsonl').exists()


def test_init_from_another_image_size_is_refused_before_anything_is_compiled(tmp_path):
  """check_init_from: architecture fields must agree, image_size included (the positional
  embedding is not interpolated): the error names the field and the converter's option."""
  big = run_config.resolve_model(_tiny_config(**{'model.image_size': 64}).model)
  checkpoints.save_params(str(tmp_path / 'big'), _aim_params(big, seed=1), big)
  cfg = run_config.resolve_model(_tiny_config().model)
  with pytest.raises(errors.ConfigError, match=r'model.image_size=64, the config has '
                                               r'model.image_size=32 .*--image-size'):
    checkpoints.check_init_from(str(tmp_path / 'big'), cfg)


def test_init_from_an_aim_model_of_another_clip_length_names_num_frames(tmp_path):
  """load_init_from: a temporal embedding of another length is an error that points at
  model.num_frames (not a generic 'architecture')."""
  short = run_config.resolve_model(_tiny_config(**{'model.num_frames': 2}).model)
  checkpoints.save_params(str(tmp_path / 'f2'), _aim_params(short, seed=1), short)
  cfg = run_config.resolve_model(_tiny_config().model)
  with pytest.raises(errors.ConfigError, match=r'temporal_embedding has shape .*'
                                               r'\(check model.num_frames\)'):
    checkpoints.load_init_from(str(tmp_path / 'f2'), _aim_params(cfg, seed=0), cfg)


# ----- training checkpoints -----------------------------------------------------------------

def test_an_optimiser_state_of_another_length_is_refused_not_truncated():
  """opt_state_from_dict: a checkpoint with more (or fewer) optimiser-state arrays than the
  current optimiser is an error naming both counts, never silently cut to fit."""
  like = {'mu': np.zeros(2, np.float32), 'nu': np.zeros(2, np.float32)}
  flat = checkpoints.opt_state_to_dict({'a': np.ones(2), 'b': np.ones(2), 'c': np.ones(2)})
  with pytest.raises(checkpoints.CheckpointError, match=r'has 3 optimiser-state arrays, the '
                                                        r'current optimiser has 2'):
    checkpoints.opt_state_from_dict(flat, like)
  back = checkpoints.opt_state_from_dict(checkpoints.opt_state_to_dict(like), like)
  assert set(back) == {'mu', 'nu'}


def test_releasing_a_lock_taken_over_by_another_run_leaves_that_runs_lock(tmp_path):
  """One run per workdir: a run releases only a LOCK that still names it, never the lock of
  the run that took the workdir over."""
  lock = checkpoints.WorkdirLock(str(tmp_path))
  lock.acquire()
  other = json.dumps({'host': 'elsewhere', 'pid': 12345, 'started': '2026-01-01T00:00:00'})
  (tmp_path / 'LOCK').write_text(other)
  lock.release()
  assert (tmp_path / 'LOCK').read_text() == other
  with checkpoints.WorkdirLock(str(tmp_path / 'mine')):
    assert (tmp_path / 'mine' / 'LOCK').exists()
  assert not (tmp_path / 'mine' / 'LOCK').exists()


# ----- evaluation reports -------------------------------------------------------------------

def test_class_names_starting_with_other_numbers_are_kept_whole(tmp_path):
  """read_class_names: 'index name' lines are read as such only 'when every line starts with
  its own index'; names that merely start with a number keep it."""
  from aim_jax import reports
  path = tmp_path / 'classes.txt'
  path.write_text('1 jump\n2 jumps\n')
  assert reports.read_class_names(str(path), 2) == ['1 jump', '2 jumps']


def test_class_names_in_index_comma_name_lines_and_with_blank_lines(tmp_path):
  """read_class_names: 'index,name' lines (the Kinetics label-map style) and blank lines
  (ignored)."""
  from aim_jax import reports
  (tmp_path / 'comma.txt').write_text('0,abseiling\n1,air drumming\n')
  assert reports.read_class_names(str(tmp_path / 'comma.txt'), 2) == ['abseiling',
                                                                       'air drumming']
  (tmp_path / 'blank.txt').write_text('run\n\njump\n  \n')
  assert reports.read_class_names(str(tmp_path / 'blank.txt'), 2) == ['run', 'jump']


def test_summary_json_is_strict_json_with_non_finite_metrics_as_null(tmp_path):
  """summary.json is JSON (RFC 8259 has no NaN or Infinity): a metric that is not finite
  (top-1 of no video) is written as null."""
  from aim_jax import reports

  def refuse(constant):
    raise ValueError(f'not JSON: {constant}')

  path = reports.write_summary(str(tmp_path / 'summary.json'),
                               {'top1': float('nan'), 'top5': np.float32('inf'), 'n': 0},
                               split='val')
  blob = json.loads(open(path).read(), parse_constant=refuse)
  assert blob == {'metrics': {'top1': None, 'top5': None, 'n': 0}, 'split': 'val'}


def test_confusion_plot_is_drawn_up_to_max_plot_classes_inclusive(tmp_path, monkeypatch):
  """plot_confusion: a confusion matrix of up to MAX_PLOT_CLASSES classes is drawn; None
  only above it."""
  from aim_jax import reports
  monkeypatch.setattr(reports, 'MAX_PLOT_CLASSES', 3)
  assert reports.plot_confusion(str(tmp_path / 'c3.png'), np.eye(3, dtype=int)) is not None
  assert reports.plot_confusion(str(tmp_path / 'c4.png'), np.eye(4, dtype=int)) is None


def test_metrics_line_gives_each_accuracy_in_percent():
  """format_metrics: 'accuracies in percent, counts, throughput'; nan stays 'nan'."""
  from aim_jax import reports
  line = reports.format_metrics(dict(top1=0.5, top5=0.875, mean_class_accuracy=float('nan'),
                                     num_evaluated=8, num_skipped=1, num_views=3,
                                     clips_per_second=12.34))
  assert line == ('top1 50.00  top5 87.50  mean-class nan  videos 8 (skipped 1)  views 3  '
                  '12.3 clips/s')


# ----- the training loop: steps per epoch, logging windows, evaluation ---------------------

def test_a_training_set_of_exactly_one_batch_is_one_step_per_epoch():
  """steps_per_epoch: examples // batch_size; only fewer examples than one batch is an error."""
  from aim_jax import train

  class Data:
    @staticmethod
    def count_examples(cfg, split):
      return 8

  c = _tiny_config(steps_per_epoch=0, batch_size=8)
  assert train.steps_per_epoch(c, Data) == 1
  c.batch_size = 16
  with pytest.raises(errors.ConfigError, match='8 training examples are fewer than batch_size=16'):
    train.steps_per_epoch(c, Data)


def test_total_epochs_become_steps_without_truncating_float_error():
  """total_steps 0: total_epochs * steps_per_epoch; 0.29 epochs of 100 steps are 29 steps
  (0.29 * 100 is 28.999999999999996 in floating point)."""
  from aim_jax import train
  plan = train.Plan(_tiny_config(total_steps=0, total_epochs=0.29, steps_per_epoch=100))
  assert plan.total_steps == 29


def test_an_infinite_optimiser_state_norm_stops_the_run():
  """docs/training.md: every step's loss, gradient norm, parameter norm and optimiser-state
  norm are checked before its checkpoint is written."""
  from aim_jax import train
  window = train.MetricWindow('wd', batch_size=8, steps_per_epoch=20)
  window.add(1, {'loss': 1.0, 'grad_norm': 1.0, 'param_norm': 1.0, 'opt_state_norm': 2.0})
  window.add(2, {'loss': 1.0, 'grad_norm': 1.0, 'param_norm': 1.0,
                 'opt_state_norm': float('inf')})
  with pytest.raises(train.NonFiniteLoss, match=r'^opt_state_norm is inf at step 2 '):
    window.check()


def _fake_run(tmp_path, monkeypatch, evals=(), **overrides):
  """The tiny config's run with a stand-in train step: step n's loss is n, and each step
  takes 1 s of a fake clock (the first, which compiles, 10 s). An evaluation returns the
  next top-1 of `evals` and takes 100 s. -> (outcome, TensorBoard scalars, workdir)."""
  tf = pytest.importorskip('tensorflow')
  del tf
  from aim_jax import train, train_state
  from projects.moving_digits import demo
  clock, calls, results = [0.0], [0], iter(evals)
  monkeypatch.setattr(train, 'time', types.SimpleNamespace(time=lambda: clock[0]))

  def step_fn(setup):
    step = jax.jit(lambda state, batch: (dict(state, step=state['step'] + 1),
                                         {'loss': (state['step'] + 1).astype(jnp.float32)}))

    def timed(state, batch):
      clock[0] += 10.0 if calls[0] == 0 else 1.0
      calls[0] += 1
      return step(state, batch)
    return timed

  def evaluate(setup, params, data_mod, eval_step):
    clock[0] += 100.0
    return {'top1': next(results, 0.0), 'top5': 1.0, 'count': 32}

  monkeypatch.setattr(train_state, 'train_step_fn', step_fn)
  monkeypatch.setattr(train, 'evaluate_during_training', evaluate)
  c = _tiny_config(**{'checkpoint.every_steps': 100, 'checkpoint.async_save': False,
                      'eval_every_steps': -1, **overrides})
  workdir = tmp_path / 'wd'
  outcome = train.train_and_evaluate(c, str(workdir))
  return outcome, demo.event_scalars(workdir / 'tensorboard'), workdir


def test_train_scalars_are_window_means_at_the_step_count_they_end(tmp_path, monkeypatch):
  """Logged every 2 steps of 5 (and at the last): each train/ scalar is the mean over its own
  window (the metrics are reset after each write), at the number of steps done; epoch is
  steps / steps_per_epoch (20); throughput leaves out the first step (compilation).
  eval_every_steps=-1: never evaluated, not even at the end (configs/common.py)."""
  outcome, scalars, _ = _fake_run(tmp_path, monkeypatch, total_steps=5, log_every_steps=2)
  assert scalars['train/loss'] == [(2, 1.5), (4, 3.5), (5, 5.0)]
  assert [s for s, _ in scalars['train/epoch']] == [2, 4, 5]
  np.testing.assert_allclose([v for _, v in scalars['train/epoch']], [0.1, 0.2, 0.25],
                             rtol=1e-6)
  # 8 clips per step, 1 s per step after the first.
  assert scalars['train/clips_per_sec'] == [(2, 8.0), (4, 8.0), (5, 8.0)]
  assert outcome['loss'] == 5.0 and not outcome.preempted
  assert 'val_top1' not in outcome and not any('/top1' in k for k in scalars)


def test_evaluation_scalars_best_checkpoint_and_throughput_around_evaluations(tmp_path,
                                                                              monkeypatch):
  """Evaluated every 2 steps on eval.split='test': '<split>/top1' at the step evaluated, the
  best top-1 (step 4's 0.75, not the first or the last) kept in best/, and evaluation time
  left out of the training throughput."""
  outcome, scalars, workdir = _fake_run(
      tmp_path, monkeypatch, evals=(0.25, 0.75, 0.5), total_steps=6, log_every_steps=2,
      eval_every_steps=2, **{'eval.split': 'test'})
  assert scalars['test/top1'] == [(2, 0.25), (4, 0.75), (6, 0.5)]
  assert 'val/top1' not in scalars
  assert [int(p) for p in os.listdir(workdir / 'best') if p.isdigit()] == [4]
  assert scalars['train/clips_per_sec'] == [(2, 8.0), (4, 8.0), (6, 8.0)]
  assert outcome['val_top1'] == 0.5


def test_without_keep_best_an_evaluation_saves_no_best_step(tmp_path, monkeypatch):
  """checkpoint.keep_best=False: evaluations are still run and logged, and no best/ step is
  written (the best manager is not opened)."""
  outcome, scalars, workdir = _fake_run(tmp_path, monkeypatch, evals=(0.5,), total_steps=2,
                                        log_every_steps=2, eval_every_steps=2,
                                        **{'checkpoint.keep_best': False})
  assert scalars['val/top1'] == [(2, 0.5)] and outcome['val_top1'] == 0.5
  assert checkpoints.saved_steps(str(workdir)) == [2]
  assert not (workdir / 'best').exists()

def test_evaluation_during_training_counts_every_synthetic_test_video_once(tmp_path):
  """The synthetic 'test' split holds 32 videos of 5 classes, 3 clips each: the evaluation
  during training counts 32 videos, its top-5 is 1 (there are five classes), and its top-1 is
  the share of correct rows that evaluating the step saved at the end writes."""
  from aim_jax import evaluate, reports, train
  c = _tiny_config(total_steps=2, eval_every_steps=2, log_every_steps=2,
                   **{'eval.split': 'test', 'checkpoint.async_save': False})
  workdir = str(tmp_path / 'wd')
  outcome = train.train_and_evaluate(c, workdir)
  assert outcome['val_count'] == 32
  assert outcome['val_top5'] == 1.0
  res = evaluate.evaluate_checkpoint(c, workdir, which='latest', progress=False)
  assert res.metrics['num_views'] == 3 and res.metrics['num_evaluated'] == 32
  rows = reports.read_predictions(str(tmp_path / 'wd' / 'eval_test_latest' / 'predictions.csv'))
  assert len(rows) == 32
  assert outcome['val_top1'] == pytest.approx(sum(r['correct'] for r in rows) / 32)


def test_a_first_start_with_init_from_trains_from_the_checkpoint(tmp_path):
  """init_from: the checkpoint's weights replace the fresh ones before the first step; the
  frozen weights (written once, never updated) are the checkpoint's."""
  from aim_jax import train
  cfg = run_config.resolve_model(_tiny_config().model)
  saved = P.flatten(_aim_params(cfg, seed=1))
  checkpoints.save_params(str(tmp_path / 'aim'), P.unflatten(saved), cfg)
  c = _tiny_config(total_steps=1, eval_every_steps=-1, init_from=str(tmp_path / 'aim'),
                   **{'checkpoint.async_save': False})
  train.train_and_evaluate(c, str(tmp_path / 'wd'))
  params, _ = checkpoints.restore_params_from_workdir(str(tmp_path / 'wd'))
  frozen = [n for n in P.flatten(params) if n.startswith('backbone/conv1/')
            or ('/attn/' in n and 'Adapter' not in n)]
  assert len(frozen) > 4
  for name in frozen:
    np.testing.assert_array_equal(P.flatten(params)[name], saved[name], err_msg=name)


# ----- the training state -------------------------------------------------------------------

def test_the_configs_label_smoothing_reaches_the_compiled_train_step():
  """train_step_fn compiles the step with the config's label_smoothing: the first step's loss
  is the cross-entropy against (1 - eps) * one_hot + eps / K of the model's logits
  (docs/official_recipe.md#head; float32, no drop path, so train and eval logits agree)."""
  from aim_jax import sharding, train_state
  from data_pipelines import synthetic
  eps = 0.3
  c = _tiny_config(label_smoothing=eps, **{'model.drop_path_rate': 0.0})
  setup = train_state.create_train_state(c, sharding.make_mesh(c.mesh), steps_per_epoch=20,
                                         total_steps=100)
  host = train_state.host_params(train_state.init_params(setup))
  rng = np.random.default_rng(0)
  host['cls_head']['fc_cls']['kernel'] = rng.normal(size=(32, 5)).astype(np.float32)
  params = train_state.init_params(setup, host)
  batch = next(synthetic.make_train_dataset(c.data, batch_size=8, seed=0))
  video = jax.device_put(batch['video'], setup.batch_shardings['video'])
  label = jax.device_put(batch['label'], setup.batch_shardings['label'])
  with setup.traced():
    logits = np.asarray(train_state.eval_logits_fn(setup)(params, video), np.float64)
    _, metrics = train_state.train_step_fn(setup)(train_state.state_from_params(setup, params),
                                                  {'video': video, 'label': label})
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.full(logp.shape, eps / 5)
  target[np.arange(8), batch['label']] += 1 - eps
  plain = -logp[np.arange(8), batch['label']].mean()
  smoothed = -(target * logp).sum(-1).mean()
  assert abs(smoothed - plain) > 1e-2                  # the check can tell them apart
  assert float(metrics['loss']) == pytest.approx(smoothed, rel=1e-4)


def test_describe_counts_the_official_trainable_parameters():
  """TrainSetup.describe: 'parameters: TRAINABLE trainable of TOTAL (PERCENT%)' with the paper's
  K400 B/16 8-frame counts (10,966,672 tunable of 96,764,560, test_train_configs)."""
  import importlib

  from aim_jax import sharding, train_state
  c = importlib.import_module('configs.k400').get_config('b16_f8')
  setup = train_state.create_train_state(c, sharding.make_mesh(c.mesh))
  assert setup.describe() == [f'parameters: 10966672 trainable of 96764560 '
                              f'({100 * 10966672 / 96764560:.2f}%)']


# ----- TensorBoard scalars ------------------------------------------------------------------

def test_flushed_scalars_are_readable_while_the_run_goes_on(tmp_path):
  """ScalarWriter.flush: what was written is in the event file for TensorBoard to read while
  the writer stays open (the loop flushes after each logging step and closes only at the
  end)."""
  pytest.importorskip('tensorflow')
  from aim_jax.metric_writer import ScalarWriter
  from projects.moving_digits import demo
  writer = ScalarWriter(str(tmp_path))
  writer.scalar('train/loss', 2.5, 10)
  writer.flush()
  try:
    assert demo.event_scalars(tmp_path) == {'train/loss': [(10, 2.5)]}
  finally:
    writer.close()
