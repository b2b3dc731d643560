"""`model.attention_impl='auto'` (the default): the attention program for where the step runs.

Three execution fields decide how a ViT block attends; none changes the parameters or the
function (models/vit.py, MultiHeadAttention):

  attention_impl       'xla' | 'cudnn' | 'pallas'
  qkv_projection       'fused' | 'split'
  temporal_attention   'einsum' | 'elementwise' | 'dot_product_attention'

'auto' in any of them is made concrete when the model is built, for the platform of the
devices the step runs on:

* NVIDIA GPU (platform 'gpu') with a half-precision compute dtype (cuDNN's flash attention
  takes bfloat16 and float16 only): cuDNN flash attention for the spatial attention, q/k/v
  as three products, the 8-frame temporal attention element-wise (broadcast multiplies and
  sums on the stream's own layout). Measured on one H200 (BENCHMARKS.md, "GPU"): cuDNN's
  kernel spends most of its time on the temporal attention's 151k sequences of 8 tokens
  (tiles of 64 rows, 8 used), so the tokens-folded-into-heads path through cuDNN
  ('dot_product_attention') is kept as an option, not the default. Before the first use in
  a process, a check runs cuDNN's forward and backward on the device in small cases of the
  model's two shapes (the spatial attention, padded and masked by length; the 8-frame
  temporal attention with the tokens folded into the heads, for that option) and compares
  them with XLA's: on CUDA 13 cuDNN may have no execution plan (jax-ml/jax#32430; on the
  H200 image of 2026-12-04 it had one), and a kernel that fails or disagrees must not train
  a model. If the check fails, 'auto' is the Pallas flash attention (Triton, from
  jax.experimental.pallas; the spatial attention only), after the same check of its own
  kernel; if that fails too, XLA. Each fallback logs a warning that says why.
* On the platforms in TEMPORAL_PALLAS_PLATFORMS (none yet: a GPU run that times the
  `temporal_pallas` rows faster puts 'gpu' in), an 'auto' temporal attention beside a fused
  spatial kernel is the project's Pallas temporal kernels (models/temporal_kernel.py) once
  their own check on the device has matched the element-wise form; if it fails, a warning,
  and the element-wise form.
* Everywhere else, and in float32: XLA attention, one fused q/k/v product, the einsum temporal
  attention (the program the golden tests check against the official model).

A field set explicitly is kept; 'auto' companions of an explicit `attention_impl` take that
kernel's layout ('cudnn': split + elementwise, 'pallas': split + elementwise,
'xla': fused + einsum). In a run of several processes each runs the check on its own GPU;
they agree when the machines share their GPUs and libraries. For a mix, set the fields.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Mapping, Optional

from absl import logging

from aim_jax.errors import first_line

AUTO = 'auto'
FIELDS = ('attention_impl', 'qkv_projection', 'temporal_attention')
# The layout each kernel is fastest with (BENCHMARKS.md, "GPU compile without a GPU").
COMPANIONS = {
    'xla': dict(qkv_projection='fused', temporal_attention='einsum'),
    'cudnn': dict(qkv_projection='split', temporal_attention='elementwise'),
    'pallas': dict(qkv_projection='split', temporal_attention='elementwise'),
}
HALF_DTYPES = ('bfloat16', 'float16')
# The platforms where an 'auto' temporal attention beside a fused spatial kernel is the
# project's Pallas kernels (models/temporal_kernel.py) instead of the element-wise form, after
# their own device check: none until a GPU run times the `temporal_pallas` rows faster
# (benchmarks/gpu.sh; predicted 175.1 -> 158-161 ms per B/16 train step on the H200).
TEMPORAL_PALLAS_PLATFORMS: tuple[str, ...] = ()
# The check's tolerance: bfloat16 outputs and gradients of values of order one.
CHECK_TOLERANCE = 3e-2
_WARNED: set = set()


def choose(cfg: Mapping, platform: str, check: bool = True) -> dict:
  """`cfg` (a resolved model config) with its 'auto' attention fields made concrete for
  `platform` ('gpu', 'cpu', 'tpu'). `check=False` skips the device check (a compile for
  devices that cannot run, `benchmarks.gpu_aot`)."""
  out = dict(cfg)
  if not any(out[k] == AUTO for k in FIELDS):
    return out
  impl = out['attention_impl'] or 'xla'
  if impl == AUTO:
    impl = 'xla'
    if platform == 'gpu' and out['dtype'] in HALF_DTYPES:
      impl = _first_that_passes(check)
  out['attention_impl'] = impl
  temporal_auto = out['temporal_attention'] == AUTO
  for k, v in COMPANIONS[impl].items():
    if out[k] == AUTO:
      out[k] = v
  if (temporal_auto and out['temporal_attention'] == 'elementwise' and impl in FUSED
      and platform in TEMPORAL_PALLAS_PLATFORMS and out['dtype'] in HALF_DTYPES):
    ok, why = temporal_check() if check else (True, '')
    if ok:
      out['temporal_attention'] = 'pallas'
    elif ('temporal', why) not in _WARNED:
      _WARNED.add(('temporal', why))
      logging.warning("model.temporal_attention='auto': the Pallas temporal attention failed "
                      'its check on this GPU (%s); using the element-wise form', why)
  return out


def platform_of(devices) -> tuple[str, bool]:
  """(platform, whether these devices can run a program here): compile-only devices of a
  GPU that is not here (`benchmarks.gpu_aot`) are 'gpu' but cannot run the check."""
  import jax
  first = next(iter(devices))
  try:
    local = first in jax.devices(first.platform)
  except RuntimeError:     # no backend of that platform here: compile-only devices
    local = False
  return first.platform, local


# The fused kernels 'auto' tries on a GPU, fastest first (BENCHMARKS.md, "GPU compile
# without a GPU"), and the names its warnings give them.
FUSED = ('cudnn', 'pallas')
_KERNEL_NAMES = {'cudnn': 'cuDNN attention', 'pallas': 'the Pallas flash attention'}


def _first_that_passes(check: bool) -> str:
  """The first of FUSED whose device check passes (all pass when `check` is False), else
  'xla'; one warning per failed check and reason."""
  for n, impl in enumerate(FUSED):
    run_check = {'cudnn': cudnn_check, 'pallas': pallas_check}[impl]   # looked up when called
    ok, why = run_check() if check else (True, '')
    if ok:
      return impl
    nxt = _KERNEL_NAMES[FUSED[n + 1]] if n + 1 < len(FUSED) else 'XLA attention'
    if (impl, why) not in _WARNED:   # once per reason: every model of the process builds alike
      _WARNED.add((impl, why))
      logging.warning("model.attention_impl='auto': %s failed its check on this GPU (%s); "
                      'using %s (set model.attention_impl to choose)',
                      _KERNEL_NAMES[impl], why, nxt)
  return 'xla'


@functools.lru_cache(maxsize=None)
def cudnn_check() -> tuple[bool, str]:
  """Run cuDNN flash attention forward and backward on the default GPU, bfloat16, in the two
  shapes the model gives it, against XLA. (ok, why not)."""
  return _compare_with_xla('cudnn')


@functools.lru_cache(maxsize=None)
def pallas_check() -> tuple[bool, str]:
  """The same for the Pallas flash attention, in the shape it runs in the model (the spatial
  attention: its companion layout computes the temporal one element-wise)."""
  return _compare_with_xla('pallas')


@functools.lru_cache(maxsize=None)
def temporal_check() -> tuple[bool, str]:
  """The Pallas temporal attention (models/temporal_kernel.py) forward and backward on the
  default device, bfloat16, 8 frames of 20 tokens x 2 heads of 64 (40 rows a frame: a
  part-filled last program), against the element-wise form. (ok, why not)."""
  return _compare_temporal_with_xla()


def concrete(fn):
  """`fn` evaluated on concrete values even when called while a function is being traced
  (a model built inside `jax.jit`): it runs in a thread of its own, where no trace is
  active (JAX keeps its trace state per thread), so the check's numbers are never tracers
  and its own `jax.jit` calls compile and run as at top level. (Forcing evaluation in this
  thread instead, `jax.ensure_compile_time_eval`, also evaluates the Pallas kernel's body
  while it is traced, which fails.)"""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='attention-check') as ex:
      return ex.submit(fn, *args, **kwargs).result()
  return wrapped


# The model's two cases: the spatial attention (tokens padded, the padding masked by length)
# and the temporal one (8 frames, the tokens folded into many heads, no mask).
# `kernels`: the kernels that run the case in the model ('pallas' leaves the temporal
# attention to its element-wise companion, and its tiles need 16 tokens or more).
CHECK_CASES = (dict(shape=(2, 20, 2, 64), valid=17, pad=None, kernels=('cudnn', 'pallas')),
               dict(shape=(2, 8, 48, 64), valid=None, pad=2, kernels=('cudnn',)))


@concrete
def _compare_with_xla(impl: str, attention_fn=None) -> tuple[bool, str]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aim_jax.models import vit
  attention_fn = attention_fn or vit.attention
  for case in CHECK_CASES:
    if impl not in case['kernels']:
      continue
    shape, valid = case['shape'], case['valid']
    n = shape[1] if valid is None else valid
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
                  for key in keys)

    def loss(impl, q, k, v):
      pad = case['pad'] or vit.DEFAULT_PAD_MULTIPLE[impl]
      y = attention_fn(q, k, v, impl=impl, valid_len=valid, pad_multiple=pad)[:, :n]
      return jnp.sum((y * g[:, :n]).astype(jnp.float32)), y

    def run(impl):
      (_, y), grads = jax.jit(jax.value_and_grad(functools.partial(loss, impl), (0, 1, 2),
                                                 has_aux=True))(q, k, v)
      return [np.asarray(t, np.float32)[:, :n] for t in (y,) + tuple(grads)]

    try:
      got = run(impl)
    except Exception as e:  # no execution plan, unsupported shape, no cuDNN: all mean no
      return False, first_line(e)
    for name, a, b in zip(('output', 'dq', 'dk', 'dv'), got, run('xla')):
      err = beyond_tolerance(a, b, CHECK_TOLERANCE)
      if err is not None:
        return False, f'{impl} {name} differs from XLA by {err:.3g} (shape {shape})'
  return True, ''


@concrete
def _compare_temporal_with_xla(kernel_fn=None) -> tuple[bool, str]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aim_jax.models import vit
  if kernel_fn is None:
    from aim_jax.models import temporal_kernel
    kernel_fn = temporal_kernel.temporal_attention
  shape = (2, 8, 20, 2, 64)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys)

  def run(fn):
    loss = lambda q, k, v: (jnp.sum((fn(q, k, v) * g).astype(jnp.float32)), fn(q, k, v))
    (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(t, np.float32) for t in (y,) + tuple(grads)]

  try:
    got = run(kernel_fn)
  except Exception as e:  # the kernel does not compile or run here
    return False, first_line(e)
  for name, a, b in zip(('output', 'dq', 'dk', 'dv'), got,
                        run(vit.attend_over_axis1_elementwise)):
    err = beyond_tolerance(a, b, CHECK_TOLERANCE)
    if err is not None:
      return False, f'pallas temporal {name} differs from XLA by {err:.3g} (shape {shape})'
  return True, ''


def beyond_tolerance(got, want, tolerance: float) -> Optional[float]:
  """The largest difference of `got` from `want` (arrays) when it is not finite or exceeds
  `tolerance` relative to `want`'s largest value (plus one: values of order one), else None.
  The device checks' rule (also models/kernel_choice.py)."""
  import numpy as np
  err = float(np.max(np.abs(got - want)))
  if not np.isfinite(err) or err > tolerance * (1.0 + float(np.max(np.abs(want)))):
    return err
  return None


def describe(cfg: Mapping, chosen: Mapping, fields: tuple[str, ...] = FIELDS) -> Optional[str]:
  """One line naming what 'auto' chose in `fields`, or None when none of them was 'auto'."""
  auto = [k for k in fields if cfg[k] == AUTO]
  if not auto:
    return None
  return 'model.' + ', model.'.join(f'{k}={chosen[k]!r}' for k in auto) + " (from 'auto')"
