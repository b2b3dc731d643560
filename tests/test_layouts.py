"""Activation layouts of the compiled train step: transposes and float32 copies.

Counts, not timings. An activation tensor here is one with the batch axis B or the
folded batch B*T among its dimensions (B=7, T=6 appear in no parameter shape), so
weight transposes (free inside a GEMM) are not counted. Two levels:
  - logical: `transpose` equations of the train step's jaxpr, the transposes the model
    code asks for, the same on every backend;
  - compiled: `transpose` and `copy` instructions on activations in the CPU executable
    (CPU layout assignment differs from the GPU's, so this is a proxy).
The figures are printed (pytest -s) and recorded in BENCHMARKS.md.
"""

import collections
import re

import jax
import jax.numpy as jnp
import pytest

from aim_jax import params as P
from aim_jax.models.factory import build_model, input_shape
from configs import tiny

B, T = 7, 6
ACTIVATION_DIMS = {B, B * T}
_HLO = re.compile(r'^\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* (transpose|copy)\(')


def _model_cfg(**overrides):
  cfg = tiny.get_config(f'frames={T}').model.to_dict()
  cfg.update(overrides)
  return cfg


def _train_step(cfg):
  """value_and_grad of the loss in the trainable parameters, frozen ones closed over."""
  model = build_model(cfg)
  video = jnp.zeros(input_shape(cfg, B))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), video))['params']
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  flat, mask = P.flatten(params), P.flatten(P.trainable_mask(params))
  train = {k: v for k, v in flat.items() if mask[k]}
  frozen = {k: v for k, v in flat.items() if not mask[k]}

  def loss(t, video, labels, rng):
    logits = model.apply({'params': P.unflatten({**frozen, **t})}, video, train=True,
                         rngs={'dropout': rng})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[:, None], 1).mean()

  args = (train, video, jnp.zeros((B,), jnp.int32), jax.random.key(1))
  return jax.value_and_grad(loss), args


def _eqns_named(jaxpr, prefix=''):
  """(eqn, its full name stack): a custom_vjp's inner jaxpr names its equations
  relative to the call, so the enclosing equation's stack is prepended."""
  for e in jaxpr.eqns:
    where = f'{prefix}/{e.source_info.name_stack}'
    yield e, where
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', sub)
        inner = getattr(inner, 'jaxpr', inner)
        if hasattr(inner, 'eqns'):
          yield from _eqns_named(inner, where)


def _eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it."""
  return (e for e, _ in _eqns_named(jaxpr))


def logical_transposes(cfg) -> list[str]:
  step, args = _train_step(cfg)
  jaxpr = jax.make_jaxpr(step)(*args).jaxpr
  return [str(e.source_info.name_stack) for e in _eqns(jaxpr)
          if e.primitive.name == 'transpose'
          and ACTIVATION_DIMS & set(e.outvars[0].aval.shape)]


def compiled_counts(cfg) -> dict:
  step, args = _train_step(cfg)
  compiled = jax.jit(step).lower(*args).compile()
  counts = collections.Counter()
  for line in compiled.as_text().splitlines():
    m = _HLO.match(line)
    if m and ACTIVATION_DIMS & {int(d) for d in m.group(1).split(',') if d}:
      counts[m.group(2)] += 1
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(transpose=counts['transpose'], copy=counts['copy'],
              mbytes=round(cost['bytes accessed'] / 1e6, 1))


FUSED = dict(attention_impl='pallas', temporal_attention='elementwise', qkv_projection='split')


def test_transpose_free_block_with_a_fused_kernel():
  """With a fused spatial kernel (BTNH in, BTNH out), the elementwise temporal attention
  and split q/k/v, the train step asks for no activation transpose at all; the XLA
  default asks for some around every attention. (cuDNN takes the same BTNH operands as
  the Pallas kernel; it cannot be traced without a GPU.)"""
  default = logical_transposes(_model_cfg())
  temporal = logical_transposes(_model_cfg(temporal_attention='elementwise'))
  fused = logical_transposes(_model_cfg(**FUSED))
  print(f'\nlogical activation transposes, tiny train step: default {len(default)}, '
        f'elementwise temporal {len(temporal)}, fused+elementwise+split {len(fused)}')
  assert fused == []
  assert 0 < len(temporal) < len(default)
  assert not [n for n in temporal if 'bqahd' in n or 'bahqk' in n]   # temporal dots gone


@pytest.mark.parametrize('name, overrides', [('default', {}),
                                             ('elementwise temporal',
                                              dict(temporal_attention='elementwise'))])
def test_report_compiled_transposes(name, overrides):
  """Reports the compiled CPU counts (recorded in BENCHMARKS.md); checks they parse."""
  counts = compiled_counts(_model_cfg(**overrides))
  print(f'\n{name}: compiled CPU activation transposes/copies {counts}')
  assert counts['transpose'] + counts['copy'] > 0 and counts['mbytes'] > 0


def test_bf16_forward_keeps_activations_in_bf16():
  """dtype=bfloat16: no float32 tensor of activation size (B*T*L*D elements or a multiple
  of L*D) is produced outside LayerNorm (whose statistics are float32 by design); the
  attention logits/probabilities (L x L) are float32 on purpose. Params stay float32."""
  cfg = _model_cfg(dtype='bfloat16')
  model = build_model(cfg)
  video = jnp.zeros(input_shape(cfg, B))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), video))['params']
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  jaxpr = jax.make_jaxpr(lambda p, v: model.apply({'params': p}, v, train=True,
                                                  rngs={'dropout': jax.random.key(0)}))(
                                                      params, video).jaxpr
  n_tok, d = 17, cfg['width']
  offenders, in_layernorm = [], 0
  for e, where in _eqns_named(jaxpr):
    for v in e.outvars:
      a = v.aval
      if (getattr(a, 'dtype', None) == jnp.float32 and a.size >= B * T * n_tok * d
          and a.size % (n_tok * d) == 0 and ACTIVATION_DIMS & set(a.shape)):
        if re.search(r'/ln_(pre|1|2|post)\b', where):
          in_layernorm += 1
        else:
          offenders.append((where, e.primitive.name, a.shape))
  assert in_layernorm > 0            # the check sees activations at all
  assert offenders == []
