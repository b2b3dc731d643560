"""`model.norm_impl` / `model.mlp_impl` = 'auto' (the default): XLA's, or the project's Pallas
kernels where a GPU has timed them faster.

The Pallas kernels (models/fused_norm.py: a ViT block's LayerNorms, one kernel each way;
models/fused_mlp.py: the fused MLP's first product with its bias and activations, and the
hidden's gradient) compile for the H200 and were predicted faster than XLA's program there
(B/16 train 127.9 -> 119.7 ms), but the first H200 run measured them slower (2026-12-04,
BENCHMARKS.md "GPU": B/16 train 228.6 -> 280.6 ms, L/14 489.2 -> 588.7 ms; their products'
GEMMs took 150 ms per step against cuBLAS's 74). 'auto' takes them on the platforms in
PALLAS_PLATFORMS, so empty: a GPU run that shows them faster would put 'gpu' in.

Where 'auto' would take them (a ViT in bfloat16 or float16 on such a platform), a check runs
first, once per process, like the attention's (models/attention_choice.py): a small ViT's
loss and trainable gradients with the Pallas kernels against XLA's, on the device. A kernel
that fails to compile or disagrees is not used: 'auto' is XLA, with a warning that says why.
The MLP kernel needs the fused joint MLP (`model.joint_mlp`, bf16's 'auto'); without it
`mlp_impl` 'auto' is XLA. A field set explicitly is kept.
"""

from __future__ import annotations

import functools
from typing import Mapping

from absl import logging

from aim_jax.errors import first_line
from aim_jax.models.attention_choice import AUTO, HALF_DTYPES, beyond_tolerance, concrete

FIELDS = ('norm_impl', 'mlp_impl')
# The platforms where 'auto' takes the Pallas kernels (after the check): none, since the H200
# timed them slower than XLA's (BENCHMARKS.md, "GPU", 2026-12-04).
PALLAS_PLATFORMS: tuple[str, ...] = ()
# The check's tolerance, relative to the largest value: bfloat16 sums of order one.
CHECK_TOLERANCE = 3e-2
_WARNED: set = set()


def choose(cfg: Mapping, platform: str, check: bool = True, *,
           mlp_fusable: bool = True) -> dict:
  """`cfg` (a resolved model config) with 'auto' `norm_impl` / `mlp_impl` made concrete for
  `platform`. `mlp_fusable`: whether the model runs the fused joint MLP the MLP kernel
  needs. `check=False` skips the device check (a compile for devices that cannot run)."""
  out = dict(cfg)
  wanted = {f for f in FIELDS if out[f] == AUTO}
  if not wanted:
    return out
  pallas = (platform in PALLAS_PLATFORMS and out['dtype'] in HALF_DTYPES
            and out['backbone'] != 'swin')
  candidates = {f for f in wanted if f != 'mlp_impl' or mlp_fusable}
  if pallas and candidates and check:
    ok, why = kernels_check()
    if not ok:
      pallas = False
      if why not in _WARNED:   # once per reason: every model of the process builds alike
        _WARNED.add(why)
        logging.warning("model.norm_impl / model.mlp_impl='auto': the Pallas kernels failed "
                        "their check on this device (%s); using XLA's (set the fields to "
                        'choose)', why)
  for f in wanted:
    out[f] = 'pallas' if pallas and f in candidates else 'xla'
  return out


@functools.lru_cache(maxsize=None)
def kernels_check() -> tuple[bool, str]:
  """A small ViT's loss and trainable gradients with the Pallas LayerNorms and MLP kernel
  against XLA's, bfloat16, on the default device. (ok, why not)."""
  return compare_with_xla()


# The small ViT of the check: the blocks the kernels run in (split q/k/v, so ln_1 hands out
# three copies of its output as on a GPU; the fused joint MLP), at widths that leave partial
# tiles, two frames.
CHECK_MODEL = dict(width=64, layers=1, heads=2, patch_size=8, image_size=16, num_frames=2,
                   num_classes=3, dtype='bfloat16', attention_impl='xla',
                   qkv_projection='split', temporal_attention='einsum', joint_mlp='fused')


@concrete
def compare_with_xla(build=None) -> tuple[bool, str]:
  """`build(cfg)`: the model builder (the factory's; a test may give another)."""
  import jax
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np

  from aim_jax import params as P
  if build is None:
    from aim_jax.models.factory import build_model
    build = functools.partial(build_model, check=False)
  video = jax.random.normal(jax.random.key(0), (2, 2, 16, 16, 3), jnp.float32)

  def run(impl):
    model = build(dict(CHECK_MODEL, norm_impl=impl, mlp_impl=impl))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), video)['params'])
    # Noise on every leaf: the adapters' zero-initialised last products would hide the
    # branches the kernels feed.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
    mask = P.flatten(P.trainable_mask(params))
    flat = P.flatten(params)
    frozen = {k: v for k, v in flat.items() if not mask[k]}

    def loss(trainable):
      logits = model.apply({'params': P.unflatten({**frozen, **trainable})}, video)
      return jnp.sum(jnp.sin(logits.astype(jnp.float32)))

    value, grads = jax.jit(jax.value_and_grad(loss))({k: v for k, v in flat.items() if mask[k]})
    return {'loss': np.asarray(value, np.float32),
            **{k: np.asarray(g, np.float32) for k, g in grads.items()}}

  try:
    got = run('pallas')
  except Exception as e:  # noqa: BLE001  no Triton, an unsupported GPU: all mean no
    return False, first_line(e)
  for name, want in run('xla').items():
    err = beyond_tolerance(got[name], want, CHECK_TOLERANCE)
    if err is not None:
      return False, f'{name} differs from XLA by {err:.3g}'
  return True, ''

