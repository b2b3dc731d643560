"""Parameter-tree utilities: names, the freeze rule, counts, scan layout.

Names are '/'-joined paths of the Flax tree, e.g.
'backbone/resblocks_3/S_Adapter/D_fc1/kernel'.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import flax
import jax
import numpy as np

# Official rule (tools/train.py): trainable iff the name contains one of these.
OFFICIAL_TRAINABLE = ('Adapter', 'temporal_embedding', 'ln_post', 'cls_head')


def flatten(params: Mapping) -> dict[str, Any]:
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def trainable_mask(params: Mapping, patterns: Sequence[str] = OFFICIAL_TRAINABLE,
                   full_finetune: bool = False) -> Any:
  """Pytree of bools: True where a parameter trains.

  `patterns` are regular expressions searched in the '/'-joined name (a plain
  substring is a valid regex, as in the official substring rule).
  """
  regexes = [re.compile(p) for p in patterns]

  def label(path, _):
    if full_finetune:
      return True
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    return any(r.search(name) for r in regexes)

  return jax.tree_util.tree_map_with_path(label, params)


def count(params: Any, mask: Any = None) -> int:
  leaves = jax.tree_util.tree_leaves(params)
  if mask is None:
    return int(sum(np.prod(x.shape) for x in leaves))
  return int(sum(np.prod(x.shape) for x, m in zip(leaves, jax.tree_util.tree_leaves(mask)) if m))


def parameter_counts(params: Any, patterns: Sequence[str] = OFFICIAL_TRAINABLE,
                     full_finetune: bool = False) -> tuple[int, int]:
  """(tunable, total) parameter counts under the freeze rule."""
  return count(params, trainable_mask(params, patterns, full_finetune)), count(params)


_LOOP = re.compile(r'^(.*?)resblocks_(\d+)/(.*)$')


def to_scan_layout(params: Mapping, prefix: str = 'resblocks') -> dict:
  """Loop layout (`resblocks_{i}/...`) -> scan layout (`resblocks/...`, layer axis 0)."""
  flat = flatten(params)
  out, stacks = {}, {}
  for name, value in flat.items():
    m = _LOOP.match(name)
    if m and f'{prefix}_' in name:
      stacks.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
    else:
      out[name] = value
  for (head, tail), layers in stacks.items():
    n = max(layers) + 1
    if sorted(layers) != list(range(n)):
      raise ValueError(f'cannot stack {head}{prefix}_*/{tail}: layers {sorted(layers)}')
    out[f'{head}{prefix}/{tail}'] = np.stack([np.asarray(layers[i]) for i in range(n)])
  return unflatten(out)


def to_loop_layout(params: Mapping, prefix: str = 'resblocks') -> dict:
  """Scan layout -> loop layout; the inverse of `to_scan_layout`."""
  flat = flatten(params)
  out = {}
  pat = re.compile(rf'^(.*?){prefix}/(.*)$')
  for name, value in flat.items():
    m = pat.match(name)
    if m and f'{prefix}_' not in name:
      for i in range(value.shape[0]):
        out[f'{m.group(1)}{prefix}_{i}/{m.group(2)}'] = value[i]
    else:
      out[name] = value
  return unflatten(out)


def is_scan_layout(params: Mapping, prefix: str = 'resblocks') -> bool:
  return any(f'/{prefix}/' in f'/{k}' for k in flatten(params))


def match_layout(params: Mapping, reference: Mapping, prefix: str = 'resblocks') -> dict:
  """Convert `params` to the layer layout (scan or loop) of `reference`."""
  want_scan, have_scan = is_scan_layout(reference, prefix), is_scan_layout(params, prefix)
  if want_scan == have_scan:
    return params
  return to_scan_layout(params, prefix) if want_scan else to_loop_layout(params, prefix)


def names(params: Mapping) -> Iterable[str]:
  return flatten(params).keys()
