"""Shared pieces of the image-model ViT formats (timm, Google .npz, SigLIP, DINOv2).

Every ViT format maps its checkpoint onto our encoder names (see
`aim_jax.models.vit`), then `finish` reads the architecture from the shapes,
builds the model config, checks every name and shape against
`jax.eval_shape` of that encoder (no allocation) and fails naming the key.
The transforms only transpose, reshape and stack: a conversion is exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aim_jax import params as P
from aim_jax.convert.registry import Report, heads_guessed
from aim_jax.errors import ConversionError

# ---------------------------------------------------------------------------
# Tensor layouts. Torch: Linear weight (out, in), Conv2d (D, 3, p, p).
# Ours: Dense kernel (in, out), attention (D, H, hd) / (H, hd, D), conv (p, p, 3, D).


def linear(w) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w).T)


def heads_in(w, heads: int) -> np.ndarray:
  """torch (H*hd, D) q/k/v weight -> (D, H, hd)."""
  w = np.asarray(w)
  return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, w.shape[0] // heads))


def heads_bias(b, heads: int) -> np.ndarray:
  b = np.asarray(b)
  return b.reshape(heads, b.shape[0] // heads)


def heads_out(w, heads: int) -> np.ndarray:
  """torch (D, H*hd) output weight -> (H, hd, D)."""
  w = np.asarray(w)
  return np.ascontiguousarray(w.T.reshape(heads, w.shape[1] // heads, w.shape[0]))


def conv(w) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def stack_qkv(q, k, v) -> np.ndarray:
  """Three (D, H, hd) kernels or (H, hd) biases -> our fused (D, 3, H, hd) / (3, H, hd)."""
  axis = 1 if np.ndim(q) == 3 else 0
  return np.stack([np.asarray(q), np.asarray(k), np.asarray(v)], axis=axis)


# ---------------------------------------------------------------------------
# Position-embedding resampling (a checkpoint trained at another resolution).


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 (torch's bicubic, A = -0.75)."""
  def near(x):
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  n = x.shape[axis]
  src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
  base = np.floor(src)
  w = _cubic(src - base)                                   # (size, 4)
  idx = np.clip(base[:, None].astype(int) + np.arange(-1, 3)[None], 0, n - 1)  # (size, 4)
  x = np.moveaxis(x, axis, 0)                              # (n, ...)
  out = np.einsum('sk,sk...->s...', w, x[idx])
  return np.moveaxis(out, 0, axis)


def resample_grid(pos: np.ndarray, new_grid: int) -> np.ndarray:
  """(g*g, D) grid position embeddings -> (new*new, D), torch bicubic align_corners=False.

  This is what timm and Hugging Face DINOv2 do at run time for another input
  size (`interpolate_pos_encoding`); we do it once, at conversion.
  """
  n, d = pos.shape
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise ConversionError(f'{n} position embeddings are not a square grid')
  if g == new_grid:
    return np.asarray(pos)
  x = np.asarray(pos, np.float64).reshape(g, g, d)         # (g*g, D) -> (g, g, D)
  x = _resize_axis(_resize_axis(x, new_grid, 0), new_grid, 1)
  return x.reshape(new_grid * new_grid, d).astype(pos.dtype)


# ---------------------------------------------------------------------------


def take(sd: Mapping, key: str, where: str = '') -> np.ndarray:
  if key not in sd:
    raise ConversionError(f'missing key {where}{key!r}')
  return np.asarray(sd[key])


def num_layers(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
  if not found:
    raise ConversionError(f'no keys match {pattern!r}: not a ViT checkpoint of this format')
  if sorted(found) != list(range(max(found) + 1)):
    raise ConversionError(f'transformer blocks {sorted(found)} are not 0..{max(found)}')
  return max(found) + 1


def finish(flat: dict, fields: dict, report: Report, image_size: int | None = None
           ) -> tuple[dict, dict, Report]:
  """Our flat encoder params + architecture fields -> (params, model config, report).

  `image_size` resamples the grid position embeddings to another resolution.
  Checks every name and shape against the encoder the config builds.
  """
  from aim_jax.models import factory
  prefix = int(fields.get('class_token', True))
  pos = flat['positional_embedding']
  grid = int(round(np.sqrt(pos.shape[0] - prefix)))
  if grid * grid + prefix != pos.shape[0]:
    raise ConversionError(f'positional embedding of {pos.shape[0]} rows is not '
                          f'{prefix} + a square grid')
  fields = {k: v for k, v in fields.items() if k != 'class_token'}
  fields['image_size'] = grid * fields['patch_size']
  if image_size and image_size != fields['image_size']:
    if image_size % fields['patch_size']:
      raise ConversionError(f'image_size {image_size} is not a multiple of the patch size '
                            f'{fields["patch_size"]}')
    new = image_size // fields['patch_size']
    flat['positional_embedding'] = np.concatenate(
        [pos[:prefix], resample_grid(pos[prefix:], new)], axis=0)
    report.notices.append(f'positional embedding resampled from {grid}x{grid} to {new}x{new} '
                          f'(bicubic) for image_size {image_size}')
    fields['image_size'] = image_size
  cfg = factory.resolve_model_config(fields)
  encoder = factory.build_encoder(cfg)
  shape = (1, cfg['image_size'], cfg['image_size'], 3)
  abstract = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  want = {k: v.shape for k, v in P.flatten(nn.unbox(abstract)['params']).items()}
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    raise ConversionError(f'{cfg["backbone"]} encoder: missing {missing[:8]}, '
                          f'unexpected {extra[:8]}')
  for name, value in flat.items():
    if tuple(value.shape) != tuple(want[name]):
      src = dict((b, a) for a, b in report.mapped).get(name, name)
      raise ConversionError(f'key {src!r}: shape {tuple(value.shape)} does not fit '
                            f'{name} {tuple(want[name])} (wrong heads= or architecture?)')
  return P.unflatten(flat), cfg, report


def heads_for(width: int, heads: int | None, report: Report | None = None) -> int:
  """The given head count, else width/64 (every released ViT), said in `report`."""
  if not heads:
    heads = max(1, width // 64)
    if report is not None:
      report.notices.append(heads_guessed(heads))
  if width % heads:
    raise ConversionError(f'width {width} is not divisible by heads={heads}; pass heads=')
  return heads
