r"""Train AIM's adapters (sharded, resumable): `python -m aim_jax.train`.

  python -m aim_jax.train --config configs/k400.py:b16_f8 --workdir gs://bucket/aim_b16_f8 \
      --config.init_from=/ckpt/clip_b16

Running the same command again resumes from the newest intact checkpoint in WORKDIR.

What a run guarantees (docs/training.md):
  * WORKDIR/LOCK: one run per workdir; a second is refused, naming the holder.
  * WORKDIR/config.json is the run's identity, written once; a resume whose config
    changes the result is refused (or recorded: --on_config_change=record).
  * A checkpoint is written only after its step's loss, gradient norm, parameter norm
    and optimiser-state norm were checked finite, so the last checkpoint is good; a
    failed save stops the run at once, naming the path and the OS error.
  * A damaged step is moved aside to WORKDIR/damaged/ (never deleted) and the previous
    one resumed.
  * SIGTERM (preemption): a checkpoint, then exit code 75 (`errors.EXIT_PREEMPTED`):
    requeue and run the same command. A finished run exits 0; a bad config or
    checkpoint 2; a diverged run 3.

Resume order: config.json, frozen/ (the frozen parameters, written once), then
checkpoints/<step>/ (trainable params, optimiser state, data position); the data
iterator restarts at that step, so a resumed run sees the same batches as an
uninterrupted one (bit-exact).
"""

from __future__ import annotations

import math
import os
import platform
import signal
import sys
import time
from typing import Any, Optional

from absl import app, flags, logging

from aim_jax import errors
from aim_jax.errors import ConfigError

FLAGS = flags.FLAGS


class NonFiniteLoss(FloatingPointError):
  """Training diverged: a loss, gradient, parameter or optimiser-state norm is not finite."""


# ---------------------------------------------------------------------------------------
# Before anything is compiled: the plan of the run.
# ---------------------------------------------------------------------------------------
def data_module(config: Any):
  """The run's data pipeline module, imported only when a run starts (tf.data's imports
  TensorFlow; the synthetic source's does not)."""
  import data_pipelines
  return data_pipelines.for_source(config.data.source)


def versions() -> dict:
  import flax
  import jax
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  return {'python': platform.python_version(), 'jax': jax.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'orbax-checkpoint': ocp.__version__,
          'numpy': np.__version__, 'platform': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()[:8]], 'device_count': jax.device_count(),
          'process_count': jax.process_count()}


def steps_per_epoch(config: Any, data_mod: Any) -> int:
  if config.steps_per_epoch:
    return int(config.steps_per_epoch)
  # count_examples honours data.num_train_examples and data.train_fraction.
  n = int(data_mod.count_examples(config.data, 'train'))
  if n < config.batch_size:
    raise ConfigError(f'{n} training examples are fewer than batch_size={config.batch_size}')
  return n // config.batch_size


class Plan:
  """The checked config of a run: model config, mesh, step counts. Nothing compiled yet."""

  def __init__(self, config: Any):
    import jax

    from aim_jax import checkpoints, run_config, sharding
    self.model_cfg = run_config.resolve_model(config.model)
    self.mesh = sharding.make_mesh(config.mesh)
    run_config.check_training_config(config, jax.process_count(),
                                     sharding.data_parallel_size(self.mesh))
    if config.init_from:
      checkpoints.check_init_from(config.init_from, self.model_cfg)
    self.data = data_module(config)
    self.steps_per_epoch = steps_per_epoch(config, self.data)
    self.total_steps = int(config.total_steps or round(config.total_epochs * self.steps_per_epoch))
    # 0: every 5 epochs (official); -1: never (not even at the end).
    self.eval_every = int(config.eval_every_steps or 5 * self.steps_per_epoch)
    if hasattr(self.data, 'split_files'):  # steps_per_epoch / num_train_examples skip the count
      self.data.split_files(config.data, 'train')
    if self.eval_every > 0 and hasattr(self.data, 'split_files'):
      try:      # the evaluation's shards, before any step: not at the first evaluation
        self.data.split_files(config.data, config.eval.split)
      except errors.UserError as e:
        raise type(e)(f'{e} (evaluated every {self.eval_every} steps: '
                      '--config.eval_every_steps=-1 trains without evaluating)') from None


# ---------------------------------------------------------------------------------------
# The state: resumed from the newest intact checkpoint, or initialised (+ init_from).
# ---------------------------------------------------------------------------------------
def restore_or_init(setup: Any, ckpt: Any, config: Any) -> tuple[dict, int]:
  """-> (state, first step to run)."""
  from aim_jax import checkpoints, train_state
  from aim_jax import params as P
  train_abs, frozen_abs = setup.split(setup.abstract_params)
  train_sh, frozen_sh = setup.split(setup.param_shardings)
  found = ckpt.restore_latest_intact(train_abs, train_sh, setup.abstract_opt,
                                     setup.opt_shardings)
  if found is not None:
    step, train_p, opt_state, meta = found
    logging.info('resuming from %s/checkpoints/%d', ckpt.workdir, step)
    frozen_p = ckpt.restore_frozen(frozen_abs, frozen_sh) if P.flatten(frozen_abs) else {}
    params = P.unflatten({**P.flatten(frozen_p), **P.flatten(train_p)})
    return (train_state.state_from_params(setup, params, int(meta['step']), opt_state),
            int(meta['data_step']))
  params = train_state.init_params(setup)
  if config.init_from:
    host, at_init = checkpoints.load_init_from(
        config.init_from, train_state.host_params(params), setup.model_cfg)
    logging.info('init_from %s; left at init (%d): %s', config.init_from, len(at_init),
                 ', '.join(at_init[:20]) + (' ...' if len(at_init) > 20 else ''))
    params = train_state.init_params(setup, host)
  _, frozen_now = setup.split(params)
  if P.flatten(frozen_now):
    ckpt.save_frozen(frozen_now)
  return train_state.state_from_params(setup, params), 0


# ---------------------------------------------------------------------------------------
# Pieces of the loop.
# ---------------------------------------------------------------------------------------
class Preemption:
  """SIGTERM sets a flag; every process learns of it at the same step."""

  def __init__(self):
    self.signalled = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame) -> None:
    logging.warning('SIGTERM: saving a checkpoint before exiting')
    self.signalled = True

  def requested(self) -> bool:
    import jax
    import numpy as np
    if jax.process_count() == 1:
      return self.signalled
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.signalled))))

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


class MetricWindow:
  """Checks each step's metrics (one step behind, so the host never waits) and averages
  them over a logging window."""

  def __init__(self, workdir: str, batch_size: int, steps_per_epoch: int):
    self.workdir, self.batch_size, self.spe = workdir, batch_size, steps_per_epoch
    self.values: dict[str, list[float]] = {}
    self.pending = None
    self.last_saved: Optional[int] = None
    self.reset()

  def reset(self) -> None:
    self.values, self.t0, self.steps = {}, time.time(), 0

  def add(self, step_done: int, metrics: Any) -> None:
    if self.pending is not None:
      self.check()
    self.pending = (step_done, metrics)
    self.steps += 1

  def check(self) -> None:
    """Fetch the pending step's metrics and stop the run if any is not finite."""
    import jax
    if self.pending is None:
      return
    step_done, metrics = self.pending
    self.pending = None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k in ('loss', 'grad_norm', 'param_norm', 'opt_state_norm')
           if k in host and not math.isfinite(host[k])]
    if bad:
      last = (f'step {self.last_saved} in {self.workdir}/checkpoints' if self.last_saved
              else 'none: no checkpoint was written before this step')
      raise NonFiniteLoss(
          ', '.join(f'{k} is {host[k]}' for k in bad) + f' at step {step_done} (counting '
          f'from 1); stopping. The last good checkpoint is {last} (nothing was saved after '
          'the bad step)')
    for k, v in host.items():
      self.values.setdefault(k, []).append(v)

  def average(self, done: int) -> dict:
    elapsed = time.time() - self.t0
    avg = {k: float(sum(v) / len(v)) for k, v in self.values.items()}
    avg['clips_per_sec'] = self.steps * self.batch_size / max(elapsed, 1e-9) if self.steps else 0.0
    avg['epoch'] = done / self.spe
    return avg


def evaluate_during_training(setup: Any, params: Any, data_mod: Any, step_fn: Any) -> dict:
  """Multi-view evaluation of `config.eval.split` (aim_jax.multiview), all processes."""
  import jax

  from aim_jax import multiview
  c = setup.config
  per_proc = c.eval.batch_size // jax.process_count()
  views = multiview.num_views(c.data, c.eval.split)
  batches = data_mod.make_eval_dataset(c.data, split=c.eval.split, batch_size=per_proc,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  with setup.traced():
    result = multiview.evaluate(
        None, params, batches, num_classes=setup.model_cfg['num_classes'], num_views=views,
        batch_size=per_proc, mesh=setup.mesh, average_clips=c.eval.average_clips,
        progress=False, param_sharding=setup.param_shardings, step_fn=step_fn)
  m = result.metrics
  return {'top1': m['top1'], 'top5': m['top5'], 'count': m['num_evaluated']}


def device_batches(setup: Any, it: Any):
  """Host batches -> global device arrays (in a prefetch thread when device_prefetch > 0)."""
  from aim_jax import sharding
  c = setup.config
  video_shape = (c.batch_size, setup.model_cfg['num_frames'], setup.model_cfg['image_size'],
                 setup.model_cfg['image_size'], 3)
  sh = setup.batch_shardings

  def put(batch):
    return {'video': sharding.put_global(batch['video'], sh['video'], video_shape),
            'label': sharding.put_global(batch['label'], sh['label'], (c.batch_size,))}

  if c.device_prefetch > 0:
    from aim_jax.prefetch import DevicePrefetcher
    prefetcher = DevicePrefetcher(it, put, c.device_prefetch)
    return prefetcher, prefetcher.close
  return map(put, it), lambda: None


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------
class Outcome(dict):
  """The last metrics, plus `preempted` (stopped by SIGTERM after a checkpoint)."""
  preempted = False


def train_and_evaluate(config: Any, workdir: str, on_config_change: str = 'refuse') -> Outcome:
  """Trains (or resumes) and returns the last metrics."""
  from aim_jax import distributed
  distributed.maybe_initialize()
  import jax

  from aim_jax import checkpoints, compile_cache
  compile_cache.configure(config)       # before anything compiles
  plan = Plan(config)
  lock = checkpoints.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    outcome = _train(config, workdir, plan, on_config_change)
  finally:
    lock.release()
  logging.info('%s', compile_cache.usage().describe())
  return outcome


def _train(config: Any, workdir: str, plan: Plan, on_config_change: str) -> Outcome:
  import json

  import jax
  from etils import epath

  from aim_jax import checkpoints, multiview, optim, train_state
  is_main = jax.process_index() == 0
  logging.info('mesh %s over %d devices (%d processes); %d steps of %d clips (%d per epoch)',
               dict(plan.mesh.shape), jax.device_count(), jax.process_count(),
               plan.total_steps, config.batch_size, plan.steps_per_epoch)
  if is_main:
    checkpoints.start_run(workdir, config, plan.model_cfg, {
        'kind': 'aim_training_run', 'steps_per_epoch': plan.steps_per_epoch,
        'total_steps': plan.total_steps}, on_config_change)
    (epath.Path(workdir) / 'versions.json').write_text(json.dumps(versions(), indent=2))
  setup = train_state.create_train_state(config, plan.mesh, steps_per_epoch=plan.steps_per_epoch,
                                         total_steps=plan.total_steps, model_cfg=plan.model_cfg)
  for lab, (n_t, n_p) in optim.describe_groups(setup.abstract_params, setup.labels).items():
    logging.info('parameter group %-16s %4d tensors %12d parameters', lab, n_t, n_p)
  for line in setup.describe():
    logging.info('%s', line)
  ckpt = checkpoints.TrainCheckpointer(workdir, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save,
                                       keep_best=config.checkpoint.keep_best)
  try:
    state, start = restore_or_init(setup, ckpt, config)
    if start >= plan.total_steps:
      logging.info('this run is finished: step %d of %d is checkpointed, nothing to train',
                   start, plan.total_steps)
    eval_step = multiview.make_eval_step(
        multiview.model_apply_fn(setup.model), setup.mesh,
        multiview.num_views(config.data, config.eval.split), config.eval.average_clips,
        setup.param_shardings)
    outcome = _loop(setup, plan, ckpt, state, start, workdir, eval_step)
  except BaseException:
    ckpt.close(quiet=True)     # the error in flight is the one to report
    raise
  ckpt.close()                 # a failed last save is an error of the run
  return outcome


def _loop(setup: Any, plan: Plan, ckpt: Any, state: dict, start: int, workdir: str,
          eval_step: Any) -> Outcome:
  import jax
  from etils import epath

  from aim_jax import train_state
  c, total = setup.config, plan.total_steps
  is_main = jax.process_index() == 0
  p_train = train_state.train_step_fn(setup)
  writer = progress = None
  if is_main:
    from aim_jax.metric_writer import ScalarWriter
    writer = ScalarWriter(str(epath.Path(workdir) / 'tensorboard'))
    if c.progress_bar:
      from tqdm import tqdm
      progress = tqdm(total=total, initial=start, desc='train', unit='step',
                      dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
  window = MetricWindow(workdir, c.batch_size, plan.steps_per_epoch)
  window.last_saved = start or None
  best_top1 = ckpt.best_metric() if c.checkpoint.keep_best else None
  outcome = Outcome()
  preemption = Preemption()
  it = plan.data.make_train_dataset(c.data, batch_size=c.batch_size // jax.process_count(),
                                    seed=c.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), start_step=start)
  batches, close_batches = device_batches(setup, it)

  def log(done: int) -> None:
    avg = window.average(done)
    outcome.clear()
    outcome.update(avg)
    if progress is not None:
      progress.set_postfix(loss=f'{avg["loss"]:.4f}', lr=f'{avg.get("lr", 0):.2e}',
                           clips_s=f'{avg["clips_per_sec"]:.1f}', refresh=False)
    if writer is not None:
      for k, v in avg.items():
        writer.scalar(f'train/{k}', v, done)
      writer.flush()
    logging.info('step %d/%d: %s', done, total,
                 ' '.join(f'{k}={v:.4g}' for k, v in sorted(avg.items())))
    window.reset()

  def evaluate(done: int) -> None:
    nonlocal best_top1
    result = evaluate_during_training(setup, state['params'], plan.data, eval_step)
    outcome.update({f'val_{k}': v for k, v in result.items()})
    logging.info('step %d: %s top-1 %.4f top-5 %.4f (%d videos)', done, c.eval.split,
                 result['top1'], result['top5'], result['count'])
    if writer is not None:
      for k in ('top1', 'top5'):
        writer.scalar(f'{c.eval.split}/{k}', result[k], done)
      writer.flush()
    if ckpt.best is not None and (best_top1 is None or result['top1'] > best_top1):
      best_top1 = result['top1']
      ckpt.save_best(done, setup.split(state['params'])[0],
                     {'step': done, 'top1': result['top1'], 'top5': result['top5']})

  try:
    for step in range(start, total):
      glob = next(batches)
      with setup.traced(), jax.transfer_guard('disallow'):   # no silent host<->device copies
        state, metrics = p_train(state, glob)
      done = step + 1
      window.add(done, metrics)
      if step == start:         # the first step includes compilation: not throughput
        jax.block_until_ready(metrics)
        window.reset()
      stopping = preemption.requested()
      saving = done % c.checkpoint.every_steps == 0 or done == total or stopping
      logging_now = done % c.log_every_steps == 0 or done == total
      evaluating = plan.eval_every > 0 and (done % plan.eval_every == 0 or done == total)
      if saving or logging_now or evaluating or stopping:
        window.check()
      if progress is not None:
        progress.update(1)
      if logging_now:
        log(done)
        ckpt.check_for_errors()
      if saving:
        ckpt.save(done, setup.split(state['params'])[0], state['opt_state'],
                  {'step': done, 'data_step': done, 'epoch': done / plan.steps_per_epoch,
                   'total_steps': total})
        window.last_saved = done
      if evaluating and not stopping:
        evaluate(done)
        window.t0 = time.time()   # evaluation time is not training throughput
      if stopping:
        logging.warning('stopped by SIGTERM after step %d; checkpoint saved (exit code %d: '
                        'run the same command to resume)', done, errors.EXIT_PREEMPTED)
        outcome.preempted = True
        break
    window.check()
  finally:
    close_batches()
    preemption.restore()
    if progress is not None:
      progress.close()
    if writer is not None:
      writer.close()
  return outcome


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
  errors.quiet_library_logs()
  try:
    outcome = train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.on_config_change)
  except NonFiniteLoss as e:
    if errors.show_traceback():
      raise
    logging.error('%s: %s', type(e).__name__, e)
    print(f'train: {type(e).__name__}: {e}', file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_NONFINITE)
  except errors.UserError as e:
    if errors.show_traceback():
      raise
    sys.exit(errors.report(e, 'train'))
  if outcome.preempted:
    sys.exit(errors.EXIT_PREEMPTED)


def _define_flags() -> None:
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'config file (configs/NAME.py[:ARG])',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'checkpoints, logs and the resolved config go here')
  flags.DEFINE_enum('on_config_change', 'refuse', ['refuse', 'record'],
                    'resuming with a config that changes the result: refuse, or record the '
                    'change in WORKDIR/config_changes.jsonl and go on')
  flags.mark_flags_as_required(['config', 'workdir'])


def run(argv: list[str] | None = None) -> None:
  """Console entry (`aim-train`)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  _define_flags()
  from aim_jax import run_config
  app.run(main, argv=argv, flags_parser=run_config.flags_parser('train'))


if __name__ == '__main__':
  run()
