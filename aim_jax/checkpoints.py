"""Checkpoints: every format this project writes or reads, in one place.

Parameter checkpoints (what conversion writes; what `init_from`, evaluation and
prediction read):

  DIR/params/        orbax StandardCheckpointer tree, loop layout (resblocks_{i})
  DIR/config.json    {"model": <model config>, "metadata": {...}}

Training workdirs (what `python -m aim_jax.train` writes; evaluation and
`convert export-aim` read them too):

  WORKDIR/config.json          resolved run config: {"model": ..., "metadata": ..., "config": ...}
                               (the model part reads like a parameter checkpoint's config.json)
  WORKDIR/versions.json        library versions of the run
  WORKDIR/frozen/              the frozen parameters, written once at the start of a run
  WORKDIR/checkpoints/<step>/  params (trainable only), opt_state, meta (step, data position)
  WORKDIR/best/<step>/         params (trainable only), meta: the best validation top-1

Only the trainable parameters and their optimiser state change during training,
so only they are rewritten every `checkpoint.every_steps` (tens of MB for
ViT-B/16 instead of ~400 MB). The keep-last-K manager and the best manager are
separate so that "the last K" and "the best" never evict each other. Arrays are
restored into whatever shardings the caller asks for, so a checkpoint written on
one mesh restores on another. Paths may be local or gs:// (orbax, etils.epath).

`load_checkpoint(path)` reads either kind; `check_init_from`/`load_init_from`
merge a parameter checkpoint into a fresh model at the start of training.
"""

from __future__ import annotations

import datetime
import json
import logging as pylogging
import os
import re
import socket
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from aim_jax import params as P
from aim_jax.errors import CheckpointError, ConfigError, first_line
from aim_jax.models.factory import ARCH_FIELDS, build_model, input_shape
from aim_jax.run_config import resolve_model

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'




def _to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)


def save_params(directory: str, params: Mapping, model_config: Mapping,
                metadata: Optional[Mapping] = None, force: bool = True) -> None:
  """Write `params` (any layout; stored in loop layout) and their model config."""
  import orbax.checkpoint as ocp
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  tree = _to_numpy(P.to_loop_layout(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((path / PARAMS_DIR).absolute() if not str(path).startswith('gs://')
               else path / PARAMS_DIR, tree, force=force)
    ckptr.wait_until_finished()
  cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  (path / CONFIG_FILE).write_text(json.dumps(
      {'model': cfg, 'metadata': dict(metadata or {})}, indent=2, default=str))


def is_params_checkpoint(directory: str) -> bool:
  path = epath.Path(directory)
  return (path / CONFIG_FILE).exists() and (path / PARAMS_DIR).exists()


def load_config(directory: str) -> tuple[dict, dict]:
  path = epath.Path(directory)
  if not path.exists():
    raise CheckpointError(f'checkpoint directory {directory} does not exist')
  if not (path / CONFIG_FILE).exists():
    raise CheckpointError(f'{directory} has no {CONFIG_FILE}: not a parameter checkpoint '
                          '(written by `python -m aim_jax.convert` or a training run)')
  try:
    blob = json.loads((path / CONFIG_FILE).read_text())
    return blob['model'], blob.get('metadata', {})
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f'{path / CONFIG_FILE} is not a checkpoint config '
                          f'({type(e).__name__}: {e})') from None


def load_params(directory: str, like: Optional[Mapping] = None) -> tuple[dict, dict, dict]:
  """-> (params as numpy, model config, metadata).

  `like`: a parameter tree (or abstract tree) whose layer layout (scan or
  loop) the result should have.
  """
  import orbax.checkpoint as ocp
  model_config, metadata = load_config(directory)
  _quiet_late_read_callbacks()
  path = epath.Path(directory) / PARAMS_DIR
  if not path.exists():
    raise CheckpointError(f'{directory} has no {PARAMS_DIR}/ directory (incomplete checkpoint)')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(path.absolute() if not str(path).startswith('gs://') else path)
  except Exception as e:  # orbax/tensorstore raise many types for a damaged tree
    raise CheckpointError(f'{path} is damaged or incomplete: {first_line(e)}') from None
  params = _to_numpy(params)
  if like is not None:
    params = P.match_layout(params, like)
  return params, model_config, metadata


_READ_ERROR = re.compile(r'Error opening "\w+" driver|OCDBT database')


class _UnretrievedReadErrors(pylogging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' reports of checkpoint reads."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).startswith('Task exception was never retrieved')
                and exc is not None and _READ_ERROR.search(str(exc)))


def _quiet_late_read_callbacks() -> None:
  """Drop the reports of reads left pending by a failed restore.

  When orbax fails to read a damaged checkpoint, its event loop is closed while some
  tensorstore reads are still in flight; their completion callbacks then raise into
  `sys.unraisablehook`, which prints a traceback per read (possibly after the one-line
  error). Reads that failed alongside the one orbax reports are tasks whose exception
  nobody retrieves: asyncio logs each, with a traceback, when it is collected (seen under
  load). Those reports carry no information beyond the one-line error, so exactly they are
  dropped: the 'Event loop is closed' ones and asyncio's reports of tensorstore read
  errors; anything else goes on as before. Installed once per process.
  """
  import sys
  asyncio_log = pylogging.getLogger('asyncio')
  if not any(isinstance(f, _UnretrievedReadErrors) for f in asyncio_log.filters):
    asyncio_log.addFilter(_UnretrievedReadErrors())
  previous = sys.unraisablehook
  if getattr(previous, '_aim_jax_quiet', False):
    return

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError and unraisable.object is None
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    previous(unraisable)

  hook._aim_jax_quiet = True
  sys.unraisablehook = hook


# ---------------------------------------------------------------------------------------
# Any checkpoint a command is pointed at: a parameter checkpoint or a training workdir.
# ---------------------------------------------------------------------------------------
def load_checkpoint(path: str, which: str = 'latest') -> tuple[dict, dict, str]:
  """-> (params as numpy, checkpoint model config, kind 'params' | 'workdir')."""
  root = epath.Path(path)
  if not root.exists():
    raise CheckpointError(f'checkpoint directory {path} does not exist')
  if is_params_checkpoint(path):
    params, model_config, _ = load_params(path)
    return params, model_config, 'params'
  if not (root / CONFIG_FILE).exists():
    raise CheckpointError(
        f'{path} is neither a parameter checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/) nor a '
        f'training workdir ({CONFIG_FILE} + {CHECKPOINTS}/)')
  params, model_config = restore_params_from_workdir(path, which)
  return params, model_config, 'workdir'


def prepare_model(model_cfg: Mapping, params: Mapping):
  """-> (model, params in the model's layer layout, boxed abstract variables)."""
  import flax.linen as nn
  model = build_model(model_cfg)
  dummy = np.zeros(input_shape(model_cfg, 1), np.float32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))
  abstract = nn.unbox(boxed)['params']
  params = P.match_layout(params, abstract)
  got = set(P.names(params))
  want = set(P.names(abstract))
  if got != want:
    missing, extra = sorted(want - got), sorted(got - want)
    raise CheckpointError(
        f'checkpoint parameters do not fit the model: missing {missing[:8]}'
        f'{"..." if len(missing) > 8 else ""}, unexpected {extra[:8]}'
        f'{"..." if len(extra) > 8 else ""}')
  for name, (a, b) in _pairs(params, abstract):
    if tuple(np.shape(a)) != tuple(b.shape):
      raise CheckpointError(
          f'parameter {name}: checkpoint shape {np.shape(a)}, model shape {b.shape}')
  return model, params, boxed['params']


def _pairs(params, abstract):
  fa, fb = P.flatten(params), P.flatten(abstract)
  return ((k, (fa[k], fb[k])) for k in sorted(fa))


def define_checkpoint_flags() -> None:
  """--checkpoint (required), --which and --labels: how evaluate and predict name a model.

  Defined once so that both commands read a checkpoint the same way
  (`checkpoints.load_checkpoint(FLAGS.checkpoint, FLAGS.which)`, `reports.read_class_names`).
  """
  from absl import flags
  flags.DEFINE_string('checkpoint', None, 'Parameter checkpoint or training workdir.')
  flags.DEFINE_enum('which', 'latest', ['latest', 'best'],
                    'Which checkpoint of a training workdir to use.')
  flags.DEFINE_string('labels', '', 'Class names, one per line (reports and printed classes).')
  flags.mark_flag_as_required('checkpoint')


# ---------------------------------------------------------------------------------------
# init_from: a parameter checkpoint merged into a fresh model at the start of training.
# ---------------------------------------------------------------------------------------
def check_init_from(path: str, model_cfg: Mapping) -> tuple[dict, str]:
  """The init_from checkpoint's config -> (its model config, 'aim' | 'image').

  Architecture fields must agree; a difference is an error naming the field.
  """
  try:
    ckpt_cfg, metadata = load_config(path)
  except CheckpointError as e:
    raise ConfigError(f'init_from: {e}') from None
  try:
    ckpt_cfg = resolve_model(ckpt_cfg)
  except ConfigError as e:
    raise ConfigError(f'init_from {path}: its config.json does not resolve: {e}') from None
  for field in ARCH_FIELDS + ('image_size',):
    if ckpt_cfg[field] != model_cfg[field]:
      hint = (' (the positional embedding is not interpolated: convert with --image-size)'
              if field == 'image_size' else '')
      raise ConfigError(
          f'init_from {path} is another architecture: its model.{field}={ckpt_cfg[field]!r}, '
          f'the config has model.{field}={model_cfg[field]!r}{hint}')
  return ckpt_cfg, str(metadata.get('kind', ''))


def load_init_from(path: str, params: dict, model_cfg: Mapping) -> tuple[dict, list[str]]:
  """Merge a parameter checkpoint into freshly initialised `params` (numpy).

  The checkpoint holds either a plain image encoder (e.g. converted CLIP): it
  goes into params['backbone'] and the adapters, temporal embedding and head
  stay at init; or a full AIM model: every leaf is taken. A head of another
  class count is left at init. -> (params, names left at init). The architecture
  was checked by `check_init_from` before anything was compiled (train.Plan).
  """
  loaded, _, _ = load_params(path, like=params)
  flat_loaded = P.flatten(loaded)
  if not any(k.startswith('backbone/') for k in flat_loaded):
    flat_loaded = {f'backbone/{k}': v for k, v in flat_loaded.items()}
  flat = P.flatten(params)
  # CLIP's image projection is not part of AIM (official: `del state_dict['proj']`).
  unused = [k for k in sorted(set(flat_loaded) - set(flat)) if not k.endswith('/proj')]
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
# A training workdir: its lock, its identity (the first config), its checkpoints.
# ---------------------------------------------------------------------------------------
CHECKPOINTS = 'checkpoints'
BEST = 'best'
FROZEN = 'frozen'
DAMAGED = 'damaged'
LOCK_FILE = 'LOCK'
CONFIG_CHANGES = 'config_changes.jsonl'

# Config fields that never change what a run computes: they may differ on resume.
# Everything else (model, data recipe, optimiser, batch, steps, seed...) is the run.
RUNTIME_FIELDS = ('progress_bar', 'log_every_steps', 'checkpoint', 'device_prefetch', 'mesh',
                  'logical_axis_rules', 'eval', 'eval_every_steps', 'data.autotune',
                  'data.num_parallel_calls', 'data.prefetch', 'data.train_files',
                  'data.val_files', 'data.test_files', 'data.tfds_data_dir',
                  'data.max_skip_rate', 'data.skip_rate_min_examples',
                  'model.remat_policy', 'model.attention_impl', 'model.temporal_attention',
                  'model.attention_pad_multiple', 'model.attention_pad_mode',
                  'model.qkv_projection', 'model.joint_mlp', 'model.norm_impl',
                  'model.mlp_impl',
                  'compiler_options', 'compilation_cache_dir',
                  # read only by a run's first start; a resume restores its checkpoint
                  'init_from',
                  # the same clips, read through the frame index or from whole records
                  'data.frame_index')


class WorkdirLock:
  """An exclusive lock on a workdir, taken before anything is written there.

  WORKDIR/LOCK holds {host, pid, started}. A second run on the same workdir is
  refused with a message naming the holder; a lock left by a dead process on this
  host is taken over with a notice. The lock file is created atomically (O_EXCL)
  on local disks; on object stores (gs://) creation is not atomic, so two runs
  started within the same second may both get it.
  """

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.held = False

  def _holder(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}

  @staticmethod
  def _alive(pid: int, started: Any = None) -> bool:
    """Whether the process that took the lock still runs on this host.

    Our own pid cannot hold a lock we failed to create (a container restarted with the
    same pid), and a live pid whose process started after the lock was taken is a reuse
    of the number (Linux: /proc/PID/stat), not the holder.
    """
    if pid == os.getpid():
      return False
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      pass
    return not WorkdirLock._started_after(pid, started)

  @staticmethod
  def _started_after(pid: int, started: Any) -> bool:
    try:
      taken = datetime.datetime.fromisoformat(str(started)).timestamp()
      with open(f'/proc/{pid}/stat') as f:
        start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])   # field 22: starttime
      with open('/proc/stat') as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith('btime'))
    except (OSError, ValueError, IndexError, StopIteration):
      return False         # not Linux, or no start time: trust the pid
    return boot + start_ticks / os.sysconf('SC_CLK_TCK') > taken + 2

  def acquire(self) -> None:
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().isoformat(timespec='seconds')}
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      for _ in range(2):
        if self._create(json.dumps(me)):
          self.held = True
          return
        self._refuse_or_take_over(me)
    except OSError as e:   # the first write into the workdir: a path that cannot be one
      raise ConfigError(f'cannot use {self.path.parent} as a workdir: '
                        f'{e.strerror or e}{f" ({e.filename})" if e.filename else ""}') from None
    raise ConfigError(f'workdir {self.path.parent}: could not take the lock {self.path}')

  def _refuse_or_take_over(self, me: dict) -> None:
    """A live holder (or one on another host) -> ConfigError; a dead one: removed."""
    holder = self._holder()
    if not holder:
      self._unreadable()
      return
    same_host = holder.get('host') == me['host']
    if (same_host and isinstance(holder.get('pid'), int)
        and not self._alive(holder['pid'], holder.get('started'))):
      logging.warning('workdir %s: taking over the lock of process %s (started %s), '
                      'which is no longer running', self.path.parent, holder['pid'],
                      holder.get('started'))
      self.path.unlink(missing_ok=True)
      return
    raise ConfigError(
        f'workdir {self.path.parent} is in use by process {holder.get("pid")} on '
        f'{holder.get("host")} (started {holder.get("started")}): use another --workdir, '
        f'or wait for it to finish (the lock is {self.path})')

  def _unreadable(self) -> None:
    """A lock that is empty or not JSON: being written this instant by a start that just
    created it, or left so by a crash or a copy. Taken over (with a notice) once it is a
    minute old on a local disk; otherwise refused, naming the file."""
    try:
      age = time.time() - os.path.getmtime(os.fspath(self.path))
    except (OSError, TypeError):
      age = None          # an object store, or gone: no age to judge by
    if age is not None and age > 60:
      logging.warning('workdir %s: taking over the unreadable lock %s (%.0f s old, empty or '
                      'not JSON)', self.path.parent, self.path, age)
      self.path.unlink(missing_ok=True)
      return
    raise ConfigError(f'workdir {self.path.parent}: its lock {self.path} is unreadable (empty '
                      'or not JSON): if no run uses this workdir, delete the file')

  def _create(self, text: str) -> bool:
    if str(self.path).startswith(('gs://', 's3://')):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def release(self) -> None:
    if self.held:
      if self._holder().get('pid') == os.getpid():
        self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _flat_config(cfg: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in cfg.items():
    name = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flat_config(v, name + '.'))
    else:
      out[name] = list(v) if isinstance(v, tuple) else v
  return out


def _runtime(name: str) -> bool:
  return any(name == f or name.startswith(f + '.') for f in RUNTIME_FIELDS)


def config_changes(saved: Mapping, current: Mapping) -> list[str]:
  """Fields (dotted) whose value changes what the run computes, saved -> current."""
  a, b = _flat_config(json.loads(json.dumps(saved, default=str))), \
      _flat_config(json.loads(json.dumps(current, default=str)))
  return [f'{k}: {a.get(k, "<unset>")!r} -> {b.get(k, "<unset>")!r}'
          for k in sorted(set(a) | set(b)) if not _runtime(k) and a.get(k) != b.get(k)]


def saved_steps(workdir: str) -> list[int]:
  """Steps a run finished saving in WORKDIR/checkpoints and WORKDIR/best (orbax names a
  finished step by its number; one in progress carries a temporary suffix)."""
  root, steps = epath.Path(workdir), set()
  for sub in (CHECKPOINTS, BEST):
    if (root / sub).is_dir():
      steps.update(int(p.name) for p in (root / sub).iterdir() if p.name.isdigit())
  return sorted(steps)


def start_run(workdir: str, config: Any, model_cfg: Mapping, metadata: Mapping,
              on_config_change: str = 'refuse') -> None:
  """First start: write config.json (the run's identity). Resume: compare with it.

  A resume whose config differs in a field that changes the result is refused
  (`on_config_change='refuse'`), or recorded in WORKDIR/config_changes.jsonl and
  accepted ('record'); config.json itself is never rewritten.
  """
  root = epath.Path(workdir)
  cfg = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  # A run to resume (and compare configs with): config.json and at least one saved step.
  # A start that failed before its first checkpoint left nothing to resume.
  has_config, steps = (root / CONFIG_FILE).exists(), saved_steps(workdir)
  if not has_config and steps:
    raise ConfigError(
        f'workdir {workdir} holds saved steps ({CHECKPOINTS}/, {BEST}/) but no {CONFIG_FILE}, '
        'the run\'s identity: put it back to resume, or train in a new workdir (nothing was '
        'changed)')
  if has_config and not steps:
    logging.warning('workdir %s: its %s is from a start that saved no step; this start '
                    'replaces it', workdir, CONFIG_FILE)
  if has_config and steps:
    try:
      blob = json.loads((root / CONFIG_FILE).read_text())
      saved_model = resolve_model(blob['model'])
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f'{root / CONFIG_FILE} is damaged ({first_line(e)}): put back a good '
                        'copy to resume, or train in a new workdir') from None
    for field in ARCH_FIELDS + ('image_size', 'num_frames', 'num_classes', 'adapters',
                                'output_dim'):
      if saved_model[field] != model_cfg[field]:
        raise ConfigError(
            f'workdir {workdir} holds a run with model.{field}={saved_model[field]!r}, the '
            f'config has model.{field}={model_cfg[field]!r}: use a new workdir to train '
            'another model')
    changes = config_changes(blob.get('config', {}), cfg) if 'config' in blob else []
    if changes and on_config_change == 'refuse':
      raise ConfigError(
          f'workdir {workdir} was started with another config; changed: '
          + '; '.join(changes[:6]) + (' ...' if len(changes) > 6 else '')
          + ' (use a new workdir, or --on_config_change=record to resume anyway and '
          f'record the change in {CONFIG_CHANGES})')
    if changes:
      logging.warning('resuming %s with a changed config (recorded in %s): %s', workdir,
                      CONFIG_CHANGES, '; '.join(changes))
      with (root / CONFIG_CHANGES).open('a') as f:
        f.write(json.dumps({'time': time.strftime('%Y-%m-%dT%H:%M:%S'), 'changes': changes,
                            'config': cfg}, default=str) + '\n')
    return
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(json.dumps(
      {'model': dict(model_cfg), 'metadata': dict(metadata), 'config': cfg},
      indent=2, default=str))


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


def _abs(path: epath.Path) -> epath.Path:
  return path if str(path).startswith('gs://') else path.absolute()


def opt_state_to_dict(opt_state: Any) -> dict[str, Any]:
  """Optax state -> {'00000': leaf, ...}: a plain tree orbax stores on any mesh.

  Empty states (set_to_zero's, masked-out leaves) have no leaves and vanish.
  """
  return {f'{i:05d}': leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(opt_state))}


def opt_state_from_dict(flat: Mapping[str, Any], like: Any) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten(like)
  if len(flat) != len(leaves):
    raise CheckpointError(f'checkpoint has {len(flat)} optimiser-state arrays, the current '
                          f'optimiser has {len(leaves)}: optimizer/trainable config changed?')
  return jax.tree_util.tree_unflatten(treedef, [flat[f'{i:05d}'] for i in range(len(leaves))])


def _abstract(tree: Any, shardings: Any = None) -> Any:
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class SaveFailed(CheckpointError):
  """A checkpoint could not be written; the previous one is still the last good one."""


class TrainCheckpointer:
  """Keep-last-K and best-by-validation managers plus the one-time frozen tree.

  `save` probes that the directory is writable first and re-raises a failed
  background save at the next call, so a run stops at once (with the path and the
  OS error) instead of training on without checkpoints.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               keep_best: bool = True):
    self.workdir = epath.Path(workdir)
    self.keep, self.async_save, self.keep_best = keep, async_save, keep_best
    self.damaged: list[str] = []
    self._open()

  def _open(self) -> None:
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=True, enable_async_checkpointing=self.async_save)
    self.manager = ocp.CheckpointManager(_abs(self.workdir / CHECKPOINTS), options=options)
    self.best = None
    if self.keep_best:
      best_options = ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m['top1'], best_mode='max',
          enable_async_checkpointing=self.async_save)
      self.best = ocp.CheckpointManager(_abs(self.workdir / BEST), options=best_options)

  # -- every N steps -------------------------------------------------------------------
  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _probe(self, directory: epath.Path) -> None:
    probe = directory / f'.write_probe.{os.getpid()}'
    try:
      directory.mkdir(parents=True, exist_ok=True)
      probe.write_text('ok')
      probe.unlink()
    except OSError as e:
      raise SaveFailed(f'cannot write checkpoints to {directory}: {e.strerror or e} '
                       f'(the last good checkpoint is unchanged)') from None

  def _on_managers(self, method: str) -> None:
    """Call `method` of the periodic and best managers; a background save's error (orbax
    wraps or re-raises the OS error) becomes SaveFailed naming the workdir."""
    for m in (self.manager, self.best):
      if m is None:
        continue
      try:
        getattr(m, method)()
      except Exception as e:
        raise SaveFailed(f'a background checkpoint save in {self.workdir} failed: '
                         f'{first_line(e)}') from e

  def check_for_errors(self) -> None:
    """Raise SaveFailed if a background save has failed."""
    self._on_managers('check_for_errors')

  def save(self, step: int, trainable: Any, opt_state: Any, meta: Mapping,
           force: bool = True) -> None:
    ocp = _ocp()
    self.check_for_errors()
    self._probe(self.workdir / CHECKPOINTS)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(trainable),
          opt_state=ocp.args.StandardSave(opt_state_to_dict(opt_state)),
          meta=ocp.args.JsonSave(dict(meta))), force=force)
    except Exception as e:  # orbax waits for the previous save here and re-raises its error
      raise SaveFailed(f'saving step {step} to {self.workdir / CHECKPOINTS} failed: '
                       f'{first_line(e)} (the last good checkpoint is unchanged)') from e

  def restore(self, step: int, trainable_like: Any, trainable_shardings: Any,
              opt_state_like: Any, opt_state_shardings: Any) -> tuple[Any, Any, dict]:
    """-> (trainable params, optimiser state, meta), placed in the given shardings."""
    ocp = _ocp()
    opt_abs = opt_state_to_dict(_abstract(opt_state_like, opt_state_shardings))
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(trainable_like, trainable_shardings)),
        opt_state=ocp.args.StandardRestore(opt_abs),
        meta=ocp.args.JsonRestore()))
    return out['params'], opt_state_from_dict(out['opt_state'], opt_state_like), out['meta']

  def restore_latest_intact(self, *like) -> Optional[tuple[int, Any, Any, dict]]:
    """The newest step that restores -> (step, params, opt_state, meta), or None.

    A step that fails to restore (missing or truncated files) is moved, never deleted,
    to WORKDIR/damaged/checkpoints-<step>-<time>, named in a warning and kept in
    `self.damaged`; the previous step is tried next.
    """
    _quiet_late_read_callbacks()
    while True:
      step = self.manager.latest_step()
      if step is None:
        return None
      try:
        return (step, *self.restore(step, *like))
      except Exception as e:  # a damaged step: orbax/tensorstore/JSON errors of any type
        src = self.workdir / CHECKPOINTS / str(step)
        dst = self.workdir / DAMAGED / f'{CHECKPOINTS}-{step}-{time.strftime("%Y%m%d-%H%M%S")}'
        logging.warning('checkpoint %s is damaged (%s); moved to %s, resuming from the '
                        'previous step', src, first_line(e), dst)
        self.close()
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        self.damaged.append(str(src))
        self._open()

  # -- best by validation ---------------------------------------------------------------
  def best_metric(self) -> Optional[float]:
    if self.best is None or self.best.latest_step() is None:
      return None
    ocp = _ocp()
    step = self.best.best_step()
    try:
      meta = self.best.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:
      logging.warning('best checkpoint %s/%s is unreadable (%s): the next evaluation '
                      'becomes the best', self.workdir / BEST, step, first_line(e))
      return None
    return float(meta['top1'])

  def save_best(self, step: int, trainable: Any, meta: Mapping) -> None:
    ocp = _ocp()
    self.check_for_errors()
    self._probe(self.workdir / BEST)
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(dict(meta))),
        metrics={'top1': float(meta['top1'])}, force=True)

  # -- frozen weights, once -------------------------------------------------------------
  def save_frozen(self, frozen: Any) -> None:
    ocp = _ocp()
    self._probe(self.workdir)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(_abs(self.workdir / FROZEN), frozen, force=True)
      ckptr.wait_until_finished()

  def restore_frozen(self, frozen_like: Any, shardings: Any) -> Any:
    ocp = _ocp()
    path = self.workdir / FROZEN
    try:
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(_abs(path), _abstract(frozen_like, shardings))
    except Exception as e:
      raise CheckpointError(f'the frozen parameters {path} are damaged: {first_line(e)} '
                            '(they are written once, at the first start: restore them from '
                            'a copy, or start a new workdir)') from None

  def wait(self) -> None:
    """Wait for the background saves; one that failed raises SaveFailed."""
    self._on_managers('wait_until_finished')
    self.check_for_errors()

  def close(self, quiet: bool = False) -> None:
    """Wait for the background saves and close. `quiet`: another error is already being
    reported, so a failed save is logged instead of raised."""
    try:
      self.wait()
    except SaveFailed as e:
      if not quiet:
        raise
      logging.error('%s', e)
    finally:
      for m in (self.manager, self.best):
        if m is not None:
          try:
            m.close()
          except Exception as e:  # a failed save may surface again here
            if not quiet:
              raise SaveFailed(f'closing the checkpoints of {self.workdir} failed: '
                               f'{first_line(e)}') from e


def _restore_numpy(path: epath.Path) -> Any:
  """A StandardCheckpointer/StandardSave tree -> numpy, on whatever devices are here."""
  ocp = _ocp()
  _quiet_late_read_callbacks()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(_abs(path))
      tree = getattr(getattr(meta, 'item_metadata', None), 'tree', None)
      if tree is None:
        raise CheckpointError(f'{path} is damaged or incomplete: its array metadata cannot '
                              'be read')
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
      return jax.tree.map(np.asarray, ckptr.restore(_abs(path), like))
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f'{path} is damaged or incomplete: {first_line(e)}') from None


def restore_params_from_workdir(workdir: str, which: str = 'latest') -> tuple[dict, dict]:
  """The full parameters of a training run -> (params as numpy, model config).

  which: 'latest' (the last periodic checkpoint) or 'best' (best validation top-1).
  The trainable leaves come from that checkpoint, the frozen ones from frozen/.
  A damaged checkpoint is an error naming its path (nothing falls back silently).
  """
  root = epath.Path(workdir)
  model_config, _ = load_config(workdir)
  if which not in ('latest', 'best'):
    raise CheckpointError(f"which must be 'latest' or 'best', got {which!r}")
  ocp = _ocp()
  sub = root / (CHECKPOINTS if which == 'latest' else BEST)
  if not sub.exists():
    raise CheckpointError(f'{workdir} has no {sub.name}/ checkpoints')
  manager = ocp.CheckpointManager(_abs(sub), options=ocp.CheckpointManagerOptions(
      read_only=True, **({'best_fn': lambda m: m['top1'], 'best_mode': 'max'}
                         if which == 'best' else {})))
  step = manager.best_step() if which == 'best' else manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f'{sub} holds no finished checkpoint')
  try:
    trainable = _restore_numpy(sub / str(step) / 'params')
  except CheckpointError as e:
    earlier = sorted((int(p.name) for p in sub.iterdir() if p.name.isdigit() and
                      int(p.name) != step), reverse=True)
    raise CheckpointError(
        f'{e} (nothing falls back silently; earlier steps in {sub}: '
        f'{", ".join(map(str, earlier)) or "none"}; resuming training moves a damaged step '
        f'to {root / DAMAGED}/)') from None
  frozen = _restore_numpy(root / FROZEN) if (root / FROZEN).exists() else {}
  params = P.unflatten({**P.flatten(frozen), **P.flatten(trainable)})
  return params, model_config
