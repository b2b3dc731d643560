"""Parameter checkpoints: an orbax tree of parameters plus the model config (JSON).

This is the format that conversion writes and that training (`init_from`),
evaluation and prediction (`--checkpoint`) read:

  DIR/params/        orbax StandardCheckpointer tree, loop layout (resblocks_{i})
  DIR/config.json    {"model": <model config>, "metadata": {...}}

Paths may be local or gs:// (orbax and etils.epath handle both).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath

from aim_jax import params as P

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


class CheckpointError(ValueError):
  """A checkpoint directory that is missing, incomplete or of another model."""


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
  blob = json.loads((path / CONFIG_FILE).read_text())
  return blob['model'], blob.get('metadata', {})


def load_params(directory: str, like: Optional[Mapping] = None) -> tuple[dict, dict, dict]:
  """-> (params as numpy, model config, metadata).

  `like`: a parameter tree (or abstract tree) whose layer layout (scan or
  loop) the result should have.
  """
  import orbax.checkpoint as ocp
  model_config, metadata = load_config(directory)
  path = epath.Path(directory) / PARAMS_DIR
  if not path.exists():
    raise CheckpointError(f'{directory} has no {PARAMS_DIR}/ directory (incomplete checkpoint)')
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path.absolute() if not str(path).startswith('gs://') else path)
  params = _to_numpy(params)
  if like is not None:
    params = P.match_layout(params, like)
  return params, model_config, metadata
