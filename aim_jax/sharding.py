"""One device mesh with named axes (data, fsdp, model) and logical-axis rules.

The model annotates parameters with logical names ('embed', 'mlp', 'heads',
'kv', 'adapter', 'classes', 'layers') and activations with 'activation_batch',
'activation_embed', 'activation_mlp'. The config's `logical_axis_rules` map
them to mesh axes; the batch is split over ('data', 'fsdp'). With 'embed' ->
'fsdp' the frozen backbone is sharded over fsdp (a backbone larger than one
device's memory can be adapted); with 'embed' -> None it is replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from aim_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, model) sizes; a -1 entry takes the devices the others leave."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.model]
  if any(not isinstance(s, int) or isinstance(s, bool) or s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))}: each of mesh.data/fsdp/model must '
                      'be a positive integer or -1 (the devices the others leave)')
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh: at most one of data/fsdp/model may be -1, got {sizes}')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ConfigError(f'mesh: {num_devices} devices are not divisible by the fixed axes '
                        f'{dict(zip(MESH_AXES, sizes))} (config fields mesh.data/fsdp/model)')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                      f'but there are {num_devices} (config fields mesh.data/fsdp/model)')
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over every device (all processes). Axis types are Auto (GSPMD annotations)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def axis_rules(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists or tuples) -> flax's tuple-of-pairs form."""
  out = []
  for rule in rules:
    name, target = rule
    out.append((str(name), tuple(target) if isinstance(target, (list, tuple)) else target))
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Any) -> Iterator[None]:
  """The global mesh (`jax.set_mesh`) and the logical-axis rules, together.

  Functions traced inside take the model's activation constraints
  (`nn.with_logical_constraint`: 'activation_batch' -> ('data', 'fsdp'), ...) as
  sharding annotations; outside a global mesh flax drops them silently.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(rules)):
    yield


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PS(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS())


def _fit(spec: PS, shape: Sequence[int], mesh: Mesh, name: str) -> PS:
  """Drop mesh axes that do not divide their dimension (that dimension is replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    group = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in group)
    if dim % size:
      logging.info('sharding: %s dim %d not divisible by %s=%d; replicated', name, dim,
                   group, size)
      out.append(None)
    else:
      out.append(axes)
  return PS(*out)


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules: Any) -> Any:
  """Shardings for a tree of (abstract) LogicallyPartitioned boxes from `model.init`."""
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, axis_rules(rules))
  values = nn.unbox(boxed_abstract)

  def one(path, spec, value):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    spec = spec if isinstance(spec, PS) else PS()
    return NamedSharding(mesh, _fit(spec, value.shape, mesh, name))

  return jax.tree_util.tree_map_with_path(
      one, mesh_specs, values, is_leaf=lambda x: isinstance(x, PS))


def like_params(param_shardings: Any, tree: Any, mesh: Mesh) -> Any:
  """Shardings for an optimiser state: a leaf shaped like a parameter takes the
  parameter's sharding (Adam moments), anything else is replicated.

  Matching is by tree path suffix (optax states embed the parameter tree).
  """
  flat = {tuple(str(getattr(k, 'key', k)) for k in path): s
          for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def one(path, leaf):
    keys = tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                 for k in path)
    for start in range(len(keys)):
      s = flat.get(keys[start:])
      if s is not None and len(s.spec) <= np.ndim(leaf):
        return s
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def put_global(local: np.ndarray, sharding: NamedSharding,
               global_shape: Sequence[int]) -> jax.Array:
  """A process-local batch slice -> one global array (multi-host safe)."""
  return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
