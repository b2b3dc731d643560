r"""Train AIM's adapters (sharded, resumable): `python -m aim_jax.train`.

  python -m aim_jax.train --config configs/k400.py:b16_f8 --workdir gs://bucket/aim_b16_f8 \
      --config.init_from=/ckpt/clip_b16

Running the same command again resumes from the latest checkpoint in WORKDIR.
On SIGTERM (preemption) a checkpoint is written before exiting. A NaN or
infinite loss stops the run with an error naming the step; checkpoints are
only written after the loss of their step was checked, so the last one is good.

Resume order (each step restores what the next needs):
  1. config.json in WORKDIR (written at the first start) is the run's identity;
  2. frozen/ holds the frozen parameters, written once;
  3. checkpoints/<step>/ holds trainable params, optimiser state and the data
     position (the step; the data pipeline resumes at `start_step`);
  4. the data iterator restarts at that step, so a resumed run sees the same
     batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import math
import os
import platform
import signal
import sys
import time
from typing import Any, Mapping

from absl import app, flags, logging

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------
# Config checks: everything that can be wrong in a config fails here, before compiling.
# ---------------------------------------------------------------------------------------
class ConfigError(ValueError):
  """A config that cannot run; the message names the field."""


ARCH_FIELDS = ('backbone', 'width', 'layers', 'heads', 'patch_size', 'mlp_ratio')


def check_config(config: Any, model_cfg: Mapping, num_devices: int, process_count: int,
                 dp_size: int) -> None:
  d = config.data
  if d.num_frames != model_cfg['num_frames']:
    raise ConfigError(f'data.num_frames={d.num_frames} differs from model.num_frames='
                      f'{model_cfg["num_frames"]}: the clip length must equal the model\'s '
                      '(set both, e.g. with configs.common.set_frames)')
  if d.image_size != model_cfg['image_size']:
    raise ConfigError(f'data.image_size={d.image_size} differs from model.image_size='
                      f'{model_cfg["image_size"]}')
  if d.num_classes != model_cfg['num_classes']:
    raise ConfigError(f'data.num_classes={d.num_classes} differs from model.num_classes='
                      f'{model_cfg["num_classes"]}')
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % accum:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by '
                      f'grad_accum_steps={accum}')
  micro = config.batch_size // accum
  if micro % dp_size:
    raise ConfigError(
        f'batch_size={config.batch_size} (per micro-batch {micro} with grad_accum_steps='
        f'{accum}) is not divisible by the data-parallel size {dp_size} '
        '(mesh.data x mesh.fsdp)')
  if config.batch_size % process_count:
    raise ConfigError(f'batch_size={config.batch_size} is not divisible by the number of '
                      f'processes {process_count}')
  if config.eval.batch_size % dp_size or config.eval.batch_size % process_count:
    raise ConfigError(f'eval.batch_size={config.eval.batch_size} is not divisible by the '
                      f'data-parallel size {dp_size} and the process count {process_count}')
  if config.device_prefetch < 0:
    raise ConfigError(f'device_prefetch={config.device_prefetch} must be >= 0 (0 = no prefetch)')
  if config.eval.average_clips not in ('prob', 'score'):
    raise ConfigError(f"eval.average_clips must be 'prob' or 'score', got "
                      f'{config.eval.average_clips!r}')
  if config.total_steps <= 0 and config.total_epochs <= 0:
    raise ConfigError('set total_steps or total_epochs (both are 0)')
  if config.label_smoothing < 0 or config.label_smoothing >= 1:
    raise ConfigError(f'label_smoothing={config.label_smoothing} is not in [0, 1)')


def check_init_from(path: str, model_cfg: Mapping) -> tuple[dict, str]:
  """The init_from checkpoint's config -> (its model config, 'aim' | 'encoder').

  Architecture fields must agree; a difference is an error naming the field.
  """
  from aim_jax import checkpoint_io
  try:
    ckpt_cfg, metadata = checkpoint_io.load_config(path)
  except checkpoint_io.CheckpointError as e:
    raise ConfigError(f'init_from: {e}') from None
  from aim_jax.models.factory import resolve_model_config
  try:
    ckpt_cfg = resolve_model_config(ckpt_cfg)
  except (KeyError, ValueError) as e:
    raise ConfigError(f'init_from {path}: its config.json does not resolve: {e}') from None
  for field in ARCH_FIELDS:
    if ckpt_cfg[field] != model_cfg[field]:
      raise ConfigError(
          f'init_from {path} is another architecture: its model.{field}={ckpt_cfg[field]!r}, '
          f'the config has model.{field}={model_cfg[field]!r}')
  if ckpt_cfg['image_size'] != model_cfg['image_size']:
    raise ConfigError(f'init_from {path}: its model.image_size={ckpt_cfg["image_size"]} '
                      f'differs from model.image_size={model_cfg["image_size"]} (the '
                      'positional embedding is not interpolated)')
  return ckpt_cfg, str(metadata.get('kind', ''))


RESUME_FIELDS = ARCH_FIELDS + ('image_size', 'num_frames', 'num_classes', 'adapters',
                               'output_dim', 'scan_layers')


def check_resume(workdir: str, model_cfg: Mapping) -> None:
  """A workdir that already holds a run must hold a run of the same model."""
  from etils import epath

  from aim_jax import checkpoint_io, checkpointing
  root = epath.Path(workdir)
  if not (root / checkpoint_io.CONFIG_FILE).exists():
    return
  if not ((root / checkpointing.CHECKPOINTS).exists() or (root / checkpointing.FROZEN).exists()):
    return
  saved, _ = checkpoint_io.load_config(workdir)
  for field in RESUME_FIELDS:
    if field in saved and saved[field] != model_cfg[field]:
      raise ConfigError(
          f'workdir {workdir} holds a run with model.{field}={saved[field]!r}, the config has '
          f'model.{field}={model_cfg[field]!r}: use a new workdir to train another model')


def load_init_from(path: str, params: dict, model_cfg: Mapping) -> tuple[dict, list[str]]:
  """Merge a parameter checkpoint into freshly initialised `params` (numpy).

  The checkpoint holds either a plain image encoder (e.g. converted CLIP): it
  goes into params['backbone'] and the adapters, temporal embedding and head
  stay at init; or a full AIM model: every leaf is taken. A head of another
  class count is left at init. -> (params, names left at init).
  """
  from aim_jax import checkpoint_io
  from aim_jax import params as P
  check_init_from(path, model_cfg)
  loaded, _, _ = checkpoint_io.load_params(path, like=params)
  flat_loaded = P.flatten(loaded)
  is_aim = any(k.startswith('backbone/') for k in flat_loaded)
  if not is_aim:
    flat_loaded = {f'backbone/{k}': v for k, v in flat_loaded.items()}
  flat = P.flatten(params)
  unused = sorted(set(flat_loaded) - set(flat))
  # CLIP's image projection is not part of AIM (official: `del state_dict['proj']`).
  unused = [k for k in unused if not k.endswith('/proj')]
  if unused:
    raise ConfigError(f'init_from {path} has parameters this model does not: {unused[:8]} '
                      '(model.adapters / model.num_frames differ?)')
  at_init = []
  for name, value in flat.items():
    if name not in flat_loaded:
      at_init.append(name)
      continue
    new = flat_loaded[name]
    if new.shape != value.shape:
      if name.startswith('cls_head/'):
        logging.warning('init_from: %s has shape %s, the model %s (model.num_classes): '
                        'left at init', name, new.shape, value.shape)
        at_init.append(name)
        continue
      field = 'model.num_frames' if 'temporal_embedding' in name else 'the architecture'
      raise ConfigError(f'init_from {path}: {name} has shape {new.shape}, the model needs '
                        f'{value.shape} (check {field})')
    flat[name] = new.astype(value.dtype)
  return P.unflatten(flat), at_init


# ---------------------------------------------------------------------------------------
# Data (tf.data, imported lazily so that steps and the model import without TensorFlow).
# ---------------------------------------------------------------------------------------
def data_module():
  """data_pipelines.input_pipeline, imported only when a run starts (it imports TensorFlow)."""
  from data_pipelines import input_pipeline
  return input_pipeline


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------
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


class NonFiniteLoss(FloatingPointError):
  pass


def run_once(jitted: Any, *args: Any) -> Any:
  """Call a jitted function that runs once per process (the parameter initialisation).

  On CPU it is compiled without LLVM's optimisation passes: they take seconds on the
  unrolled random-number code of every parameter's initialiser and buy nothing for one
  call. The random bits are integer arithmetic and identical; float rounding in the
  transforms (truncated normal) may differ from an optimised build by ~1e-8.
  """
  import jax
  lowered = jitted.lower(*args)
  if jax.default_backend() == 'cpu':
    return lowered.compile({'xla_backend_optimization_level': 0})(*args)
  return lowered.compile()(*args)


def steps_per_epoch(config: Any, data_mod: Any) -> int:
  if config.steps_per_epoch:
    return int(config.steps_per_epoch)
  # count_examples honours data.num_train_examples and data.train_fraction.
  n = int(data_mod.count_examples(config.data, 'train'))
  if n < config.batch_size:
    raise ConfigError(f'{n} training examples are fewer than batch_size={config.batch_size}')
  return n // config.batch_size


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains (or resumes) and returns the last metrics."""
  from aim_jax import distributed
  distributed.maybe_initialize()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from etils import epath

  from aim_jax import checkpointing, optim, sharding, steps
  from aim_jax import params as P
  from aim_jax.models.factory import build_model, resolve_model_config

  is_main = jax.process_index() == 0
  # == Config =============================================================================
  try:
    model_cfg = resolve_model_config(config.model)
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e)) from None
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh)
  check_config(config, model_cfg, jax.device_count(), jax.process_count(), dp)
  if config.init_from:
    check_init_from(config.init_from, model_cfg)
  check_resume(workdir, model_cfg)
  data_mod = data_module()
  spe = steps_per_epoch(config, data_mod)
  total_steps = int(config.total_steps or round(config.total_epochs * spe))
  # 0: every 5 epochs (official); -1: never (not even at the end).
  eval_every = int(config.eval_every_steps or 5 * spe)
  rules = sharding.axis_rules(config.logical_axis_rules)
  logging.info('mesh %s over %d devices (%d processes); %d steps of %d clips '
               '(%d per epoch)', dict(mesh.shape), jax.device_count(), jax.process_count(),
               total_steps, config.batch_size, spe)
  wd = epath.Path(workdir)
  if is_main:
    wd.mkdir(parents=True, exist_ok=True)
    checkpointing.write_run_config(workdir, config, model_cfg, {
        'kind': 'aim_training_run', 'steps_per_epoch': spe, 'total_steps': total_steps})
    (wd / 'versions.json').write_text(json.dumps(versions(), indent=2))
    logging.info('config:\n%s', config)

  # == Model and shardings ================================================================
  model = build_model(model_cfg)
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  dummy = jnp.zeros((dp, t, s, s, 3), jnp.float32)

  def init(rng):
    return model.init({'params': rng}, dummy, train=False)['params']

  # Everything that traces the model runs under the global mesh and the logical rules
  # (sharding.mesh_context), so the model's activation constraints apply. Placement
  # of the params comes from out_shardings (dims that do not divide their mesh axes
  # are replicated there, see sharding.logical_shardings).
  with sharding.mesh_context(mesh, rules):
    boxed = jax.eval_shape(init, jax.random.key(config.seed))
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  mask = P.trainable_mask(abstract_params, list(config.trainable), config.full_finetune)
  trainable = steps.trainable_names(mask)
  schedule = optim.make_schedule(config.optimizer, spe, total_steps)
  tx, labels = optim.make_optimizer(abstract_params, config.optimizer, schedule,
                                    list(config.trainable), config.full_finetune)
  for lab, (n_t, n_p) in optim.describe_groups(abstract_params, labels).items():
    logging.info('parameter group %-16s %4d tensors %12d parameters', lab, n_t, n_p)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding.like_params(param_shardings, abstract_opt, mesh)
  rep = sharding.replicated(mesh)
  state_shardings = {'step': rep, 'params': param_shardings, 'opt_state': opt_shardings}

  def split(tree):
    train, frozen = steps.split_params(tree, trainable)
    return P.unflatten(train), P.unflatten(frozen)

  # == State: resume, or initialise (+ init_from) =========================================
  ckpt = checkpointing.TrainCheckpointer(workdir, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save,
                                         keep_best=config.checkpoint.keep_best)
  train_abs, frozen_abs = split(abstract_params)
  train_sh, frozen_sh = split(param_shardings)
  start = ckpt.latest_step()
  best_top1 = ckpt.best_metric() if config.checkpoint.keep_best else None
  if start is not None:
    logging.info('resuming from %s/checkpoints/%d', workdir, start)
    train_p, opt_state, meta = ckpt.restore(start, train_abs, train_sh, abstract_opt,
                                            opt_shardings)
    frozen_p = ckpt.restore_frozen(frozen_abs, frozen_sh) if P.flatten(frozen_abs) else {}
    params = P.unflatten({**P.flatten(frozen_p), **P.flatten(train_p)})
    state = {'step': jax.device_put(jnp.asarray(meta['step'], jnp.int32), rep),
             'params': params, 'opt_state': opt_state}
    start = int(meta['data_step'])
  else:
    start = 0
    with sharding.mesh_context(mesh, rules):
      params = run_once(jax.jit(lambda r: nn.unbox(init(r)), out_shardings=param_shardings),
                        jax.random.key(config.seed))
    if config.init_from:
      host = jax.tree.map(np.asarray, jax.device_get(params))
      host, at_init = load_init_from(config.init_from, host, model_cfg)
      logging.info('init_from %s; left at init (%d): %s', config.init_from, len(at_init),
                   ', '.join(at_init[:20]) + (' ...' if len(at_init) > 20 else ''))
      params = jax.tree.map(lambda x, sh: jax.make_array_from_callback(
          x.shape, sh, lambda idx, x=x: x[idx]), host, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = {'step': jax.device_put(jnp.zeros((), jnp.int32), rep), 'params': params,
             'opt_state': opt_state}
    _, frozen_now = split(params)
    if P.flatten(frozen_now):
      ckpt.save_frozen(frozen_now)
  n_train, n_total = P.count(abstract_params, mask), P.count(abstract_params)
  logging.info('parameters: %d trainable of %d (%.2f%%)', n_train, n_total,
               100 * n_train / n_total)

  # == Compiled steps =====================================================================
  video_shape = (config.batch_size, t, s, s, 3)
  batch_sh = {'video': sharding.batch_sharding(mesh, 5), 'label': sharding.batch_sharding(mesh, 1)}
  step_fn = functools.partial(
      steps.train_step, model=model, tx=tx, trainable=trainable, seed=config.seed,
      num_classes=model_cfg['num_classes'], accum_steps=config.grad_accum_steps,
      label_smoothing=config.label_smoothing, mixup_alpha=config.mixup_alpha,
      schedule=schedule)
  p_train = jax.jit(step_fn, in_shardings=(state_shardings, batch_sh),
                    out_shardings=(state_shardings, rep), donate_argnums=(0,))
  eval_fn = functools.partial(steps.eval_step, model=model,
                              average_clips=config.eval.average_clips)
  eval_sh = {'video': sharding.batch_sharding(mesh, 6), 'label': sharding.batch_sharding(mesh, 1),
             'mask': sharding.batch_sharding(mesh, 1)}
  p_eval = jax.jit(eval_fn, in_shardings=(param_shardings, eval_sh), out_shardings=rep)

  def run_jit(fn, *args):
    # Traced under the global mesh: the activation constraints ('activation_batch' ->
    # ('data', 'fsdp'), ...) join the explicit in/out shardings of params and batch.
    with sharding.mesh_context(mesh, rules):
      return fn(*args)

  # == Evaluation =========================================================================
  def evaluate() -> dict:
    per_proc = config.eval.batch_size // jax.process_count()
    it = data_mod.make_eval_dataset(config.data, split=config.eval.split, batch_size=per_proc,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    totals = {'top1': 0.0, 'top5': 0.0, 'count': 0.0}
    template = None
    while True:
      batch = next(it, None)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        alive = multihost_utils.process_allgather(np.asarray(batch is not None))
        if not np.any(alive):
          break
      elif batch is None:
        break
      if batch is not None:
        template = batch
        n = len(batch['label'])
        pad = per_proc - n
        local = {
            'video': np.concatenate([batch['video'], np.zeros(
                (pad,) + batch['video'].shape[1:], np.float32)]) if pad else batch['video'],
            'label': np.concatenate([batch['label'], np.zeros(pad, np.int32)]),
            'mask': np.concatenate([np.ones(n, np.int32), np.zeros(pad, np.int32)])}
      else:   # this process is done; others still have videos: feed masked padding
        if template is None:
          raise RuntimeError(f'process {jax.process_index()} got no {config.eval.split} '
                             'videos at all; use fewer processes or more videos')
        local = {'video': np.zeros((per_proc,) + template['video'].shape[1:], np.float32),
                 'label': np.zeros(per_proc, np.int32), 'mask': np.zeros(per_proc, np.int32)}
      glob = {k: sharding.put_global(v, eval_sh[k], (config.eval.batch_size,) + v.shape[1:])
              for k, v in local.items()}
      out = jax.device_get(run_jit(p_eval, state['params'], glob))
      for k in totals:
        totals[k] += float(out[k])
    n = max(totals['count'], 1.0)
    return {'top1': totals['top1'] / n, 'top5': totals['top5'] / n, 'count': totals['count']}

  # == Logging ============================================================================
  writer = None
  if is_main:
    from aim_jax.metric_writer import ScalarWriter
    writer = ScalarWriter(str(wd / 'tensorboard'))
  progress = None
  if is_main and config.progress_bar:
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=start, desc='train', unit='step',
                    dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

  # == Preemption =========================================================================
  stop = {'signal': False}

  def on_sigterm(signum, frame):
    logging.warning('SIGTERM: saving a checkpoint before exiting')
    stop['signal'] = True

  previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

  def should_stop() -> bool:
    if jax.process_count() == 1:
      return stop['signal']
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(stop['signal']))))

  # == Loop ===============================================================================
  per_proc_batch = config.batch_size // jax.process_count()
  it = data_mod.make_train_dataset(config.data, batch_size=per_proc_batch, seed=config.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(), start_step=start)
  last_saved = start if start else None
  window: dict[str, list[float]] = {}
  last_metrics: dict = {}
  pending = None
  t_window, n_window = time.time(), 0

  def check(pending_item) -> None:
    step_done, metrics = pending_item
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(host['loss']):
      raise NonFiniteLoss(
          f'loss is {host["loss"]} at step {step_done} (counting from 1); stopping. The last '
          f'good checkpoint is step {last_saved} in {workdir}/checkpoints '
          '(nothing was saved after the bad step)')
    for k, v in host.items():
      window.setdefault(k, []).append(v)

  def save(step_done: int) -> None:
    nonlocal last_saved
    train_p, _ = split(state['params'])
    ckpt.save(step_done, train_p, state['opt_state'],
              {'step': step_done, 'data_step': step_done, 'epoch': step_done / spe,
               'total_steps': total_steps})
    last_saved = step_done

  def put(batch):
    return {'video': sharding.put_global(batch['video'], batch_sh['video'], video_shape),
            'label': sharding.put_global(batch['label'], batch_sh['label'],
                                         (config.batch_size,))}

  if config.device_prefetch > 0:
    from aim_jax.prefetch import DevicePrefetcher
    batches = DevicePrefetcher(it, put, config.device_prefetch)
    close_batches = batches.close
  else:
    batches, close_batches = map(put, it), lambda: None

  try:
    for step in range(start, total_steps):
      glob = next(batches)
      state, metrics = run_jit(p_train, state, glob)
      if pending is not None:
        check(pending)          # the previous step's metrics: one step behind keeps overlap
      pending = (step + 1, metrics)
      done = step + 1
      n_window += 1
      if step == start:         # the first step includes compilation: not throughput
        jax.block_until_ready(metrics)
        t_window, n_window = time.time(), 0
      stopping = should_stop()
      boundary = (done % config.log_every_steps == 0 or done == total_steps or stopping
                  or done % config.checkpoint.every_steps == 0
                  or (eval_every > 0 and done % eval_every == 0))
      if boundary:
        check(pending)
        pending = None
      if progress is not None:
        progress.update(1)
      if done % config.log_every_steps == 0 or done == total_steps:
        elapsed = time.time() - t_window
        avg = {k: float(np.mean(v)) for k, v in window.items()}
        avg['clips_per_sec'] = n_window * config.batch_size / max(elapsed, 1e-9) if n_window else 0.0
        avg['epoch'] = done / spe
        last_metrics = avg
        if progress is not None:
          progress.set_postfix(loss=f'{avg["loss"]:.4f}', lr=f'{avg["lr"]:.2e}',
                               clips_s=f'{avg["clips_per_sec"]:.1f}', refresh=False)
        if writer is not None:
          for k, v in avg.items():
            writer.scalar(f'train/{k}', v, done)
          writer.flush()
        logging.info('step %d/%d: %s', done, total_steps,
                     ' '.join(f'{k}={v:.4g}' for k, v in sorted(avg.items())))
        window, t_window, n_window = {}, time.time(), 0
      if done % config.checkpoint.every_steps == 0 or done == total_steps or stopping:
        save(done)
      if eval_every > 0 and (done % eval_every == 0 or done == total_steps) and not stopping:
        result = evaluate()
        last_metrics.update({f'val_{k}': v for k, v in result.items()})
        logging.info('step %d: %s top-1 %.4f top-5 %.4f (%d videos)', done,
                     config.eval.split, result['top1'], result['top5'], result['count'])
        if writer is not None:
          for k in ('top1', 'top5'):
            writer.scalar(f'{config.eval.split}/{k}', result[k], done)
          writer.flush()
        if ckpt.best is not None and (best_top1 is None or result['top1'] > best_top1):
          best_top1 = result['top1']
          ckpt.save_best(done, split(state['params'])[0],
                         {'step': done, 'top1': result['top1'], 'top5': result['top5']})
        t_window = time.time()   # evaluation time is not training throughput
      if stopping:
        logging.warning('stopped by SIGTERM after step %d; checkpoint saved', done)
        break
  finally:
    close_batches()
    signal.signal(signal.SIGTERM, previous_handler)
    if progress is not None:
      progress.close()
    if writer is not None:
      writer.close()
    ckpt.close()
  return last_metrics


def run(argv: list[str] | None = None) -> None:
  """Console entry (`aim-train`)."""
  _define_flags()
  app.run(main, argv=argv)


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's per-save INFO chatter (warnings and errors still pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, NonFiniteLoss) as e:
    logging.error('%s: %s', type(e).__name__, e)
    sys.exit(f'{type(e).__name__}: {e}')


def _define_flags() -> None:
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'config file (configs/NAME.py[:ARG])',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'checkpoints, logs and the resolved config go here')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  _define_flags()
  app.run(main)
