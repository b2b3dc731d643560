"""Training checkpoints in a workdir (orbax CheckpointManager).

  WORKDIR/config.json          resolved run config: {"model": ..., "metadata": ..., "config": ...}
                               (the model part reads like a parameter checkpoint's config.json)
  WORKDIR/versions.json        library versions of the run
  WORKDIR/frozen/              the frozen parameters, written once at the start of a run
  WORKDIR/checkpoints/<step>/  params (trainable only), opt_state, meta (step, data position)
  WORKDIR/best/<step>/         params (trainable only), meta: the best validation top-1

Only the trainable parameters and their optimiser state change during training,
so only they are rewritten every `checkpoint.every_steps` (tens of MB for
ViT-B/16 instead of ~400 MB). The keep-last-K manager and the best manager are
separate so that "the last K" and "the best" never evict each other.

Arrays are restored into whatever shardings the caller asks for, so a
checkpoint written on one mesh restores on another.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath

from aim_jax import checkpoint_io
from aim_jax import params as P

CHECKPOINTS = 'checkpoints'
BEST = 'best'
FROZEN = 'frozen'


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
    raise ValueError(f'checkpoint has {len(flat)} optimiser-state arrays, the current '
                     f'optimiser has {len(leaves)}: optimizer/trainable config changed?')
  return jax.tree_util.tree_unflatten(treedef, [flat[f'{i:05d}'] for i in range(len(leaves))])


def _abstract(tree: Any, shardings: Any = None) -> Any:
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class TrainCheckpointer:
  """Keep-last-K and best-by-validation managers plus the one-time frozen tree."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               keep_best: bool = True):
    ocp = _ocp()
    self.workdir = epath.Path(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(_abs(self.workdir / CHECKPOINTS), options=options)
    self.best = None
    if keep_best:
      best_options = ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m['top1'], best_mode='max',
          enable_async_checkpointing=async_save)
      self.best = ocp.CheckpointManager(_abs(self.workdir / BEST), options=best_options)

  # -- every N steps -------------------------------------------------------------------
  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, trainable: Any, opt_state: Any, meta: Mapping,
           force: bool = True) -> None:
    ocp = _ocp()
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(trainable),
        opt_state=ocp.args.StandardSave(opt_state_to_dict(opt_state)),
        meta=ocp.args.JsonSave(dict(meta))), force=force)

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

  # -- best by validation ---------------------------------------------------------------
  def best_metric(self) -> Optional[float]:
    if self.best is None or self.best.latest_step() is None:
      return None
    ocp = _ocp()
    step = self.best.best_step()
    meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return float(meta['top1'])

  def save_best(self, step: int, trainable: Any, meta: Mapping) -> None:
    ocp = _ocp()
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(dict(meta))),
        metrics={'top1': float(meta['top1'])}, force=True)

  # -- frozen weights, once -------------------------------------------------------------
  def has_frozen(self) -> bool:
    return (self.workdir / FROZEN / 'commit_success.txt').exists() or (
        self.workdir / FROZEN / '_CHECKPOINT_METADATA').exists()

  def save_frozen(self, frozen: Any) -> None:
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(_abs(self.workdir / FROZEN), frozen, force=True)
      ckptr.wait_until_finished()

  def restore_frozen(self, frozen_like: Any, shardings: Any) -> Any:
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(_abs(self.workdir / FROZEN), _abstract(frozen_like, shardings))

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.manager.close()
    if self.best is not None:
      self.best.close()


def _restore_numpy(path: epath.Path) -> Any:
  """A StandardCheckpointer/StandardSave tree -> numpy, on whatever devices are here."""
  ocp = _ocp()
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(_abs(path)).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, ckptr.restore(_abs(path), like))


def write_run_config(workdir: str, config: Any, model_config: Mapping, metadata: Mapping) -> None:
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  cfg = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  (path / checkpoint_io.CONFIG_FILE).write_text(json.dumps(
      {'model': dict(model_config), 'metadata': dict(metadata), 'config': cfg},
      indent=2, default=str))


def restore_params_from_workdir(workdir: str, which: str = 'latest') -> tuple[dict, dict]:
  """The full parameters of a training run -> (params as numpy, model config).

  which: 'latest' (the last periodic checkpoint) or 'best' (best validation top-1).
  The trainable leaves come from that checkpoint, the frozen ones from frozen/.
  """
  root = epath.Path(workdir)
  model_config, _ = checkpoint_io.load_config(workdir)
  if which not in ('latest', 'best'):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  ocp = _ocp()
  sub = root / (CHECKPOINTS if which == 'latest' else BEST)
  if not sub.exists():
    raise checkpoint_io.CheckpointError(f'{workdir} has no {sub.name}/ checkpoints')
  manager = ocp.CheckpointManager(_abs(sub), options=ocp.CheckpointManagerOptions(
      read_only=True, **({'best_fn': lambda m: m['top1'], 'best_mode': 'max'}
                         if which == 'best' else {})))
  step = manager.best_step() if which == 'best' else manager.latest_step()
  manager.close()
  if step is None:
    raise checkpoint_io.CheckpointError(f'{sub} holds no finished checkpoint')
  trainable = _restore_numpy(sub / str(step) / 'params')
  frozen = _restore_numpy(root / FROZEN) if (root / FROZEN).exists() else {}
  params = P.unflatten({**P.flatten(frozen), **P.flatten(trainable)})
  return params, model_config
