"""The LayerNorm and activations that keep little for the backward pass (aim_jax.models.norm).

Forward values must be flax.linen.LayerNorm's exactly (the golden tests rest on it),
gradients must be those of automatic differentiation, and what a training step keeps
for its backward pass must be the input and float32 row statistics only: no
activation-sized float32 tensor, scanned or not.
"""

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from aim_jax.models import vit
from tests.model_helpers import equations, mlp_adapter_inputs
from aim_jax.models.adapters import Adapter, AdapterSpec, DropPath
from aim_jax.models.norm import (DenseActivation, LayerNorm, gelu_exact, layer_norm,
                                 recompute_activation)


class _Residual:
  """One line of `print_saved_residuals`: 'f32[2,8,16,64] output of mul from ...'."""
  def __init__(self, line):
    m = re.match(r'(\w+)\[([\d,]*)\] (.*)', line)
    self.dtype, self.why = m.group(1), m.group(3)
    self.shape = tuple(int(n) for n in m.group(2).split(',') if n)
    self.size = int(np.prod(self.shape))

  def __repr__(self):
    return f'{self.dtype}{list(self.shape)} {self.why}'


def saved_residuals(f, *args):
  """What jax keeps from f's forward pass for its backward pass (public API, parsed)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, *args)
  rows = [_Residual(line) for line in buf.getvalue().splitlines() if line.strip()]
  assert rows, 'print_saved_residuals printed nothing'
  return rows


def _inputs(dtype, shape=(3, 5, 7, 96), seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  # An offset mean and a spread, so the variance's form matters.
  x = (2.0 + 3.0 * jax.random.normal(k[0], shape)).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(k[1], shape[-1:])
  bias = 0.1 * jax.random.normal(k[2], shape[-1:])
  dy = jax.random.normal(k[3], shape).astype(dtype)
  return x, scale, bias, dy


def _flax(x, scale, bias, eps, dtype):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False).apply(
      {'params': {'scale': scale, 'bias': bias}}, x)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_forward_is_flax_layernorm_bit_for_bit(dtype):
  x, scale, bias, _ = _inputs(dtype)
  ours = LayerNorm(epsilon=1e-5, dtype=dtype).apply({'params': {'scale': scale, 'bias': bias}}, x)
  ref = _flax(x, scale, bias, 1e-5, dtype)
  assert ours.dtype == ref.dtype == dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))


def test_statistics_lose_no_digits_to_a_large_mean():
  """Rows whose mean is large against their spread (a residual stream that has drifted):
  the variance as the mean square of x - mean keeps the float32 digits that E[x^2] - E[x]^2
  cancels, so the output matches a float64 LayerNorm (torch's, the official model's, takes
  its variance the same way)."""
  x = (30.0 + 0.01 * jax.random.normal(jax.random.key(1), (64, 768))).astype(jnp.float32)
  scale, bias = jnp.ones(768), jnp.zeros(768)
  x64 = np.asarray(x, np.float64)
  ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  ours = np.asarray(layer_norm(x, scale, bias, 1e-5, jnp.float32))
  fast = np.asarray(nn.LayerNorm(epsilon=1e-5, use_fast_variance=True).apply(
      {'params': {'scale': scale, 'bias': bias}}, x))
  assert np.abs(ours - ref).max() < 1e-3
  assert np.abs(fast - ref).max() > 0.1      # the fast form on the same rows


def test_parameters_are_flax_layernorm_parameters():
  x = jnp.zeros((2, 4, 32))
  ours = nn.unbox(LayerNorm(epsilon=1e-6).init(jax.random.key(0), x))   # 'embed'-partitioned
  ref = nn.LayerNorm(epsilon=1e-6).init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), ref)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), ours, ref))


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_gradients_match_automatic_differentiation(dtype, tol):
  x, scale, bias, dy = _inputs(dtype)
  f_ours = lambda x, s, b: layer_norm(x, s, b, 1e-5, dtype)
  f_ref = lambda x, s, b: _flax(x, s, b, 1e-5, dtype)
  _, vjp_ours = jax.vjp(f_ours, x, scale, bias)
  _, vjp_ref = jax.vjp(f_ref, x, scale, bias)
  for name, a, b in zip(('x', 'scale', 'bias'), vjp_ours(dy), vjp_ref(dy)):
    assert a.dtype == b.dtype, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < tol, (name, err)


def test_gradient_is_the_finite_difference_in_float64():
  """Independent of flax: the analytic backward against central differences."""
  with jax.enable_x64(True):
    x, scale, bias, dy = _inputs(jnp.float64, shape=(2, 3, 16), seed=1)
    f = lambda x: jnp.vdot(layer_norm(x, scale, bias, 1e-5, jnp.float64), dy)
    g = jax.grad(f)(x)
    e = np.zeros(x.shape)
    for idx in [(0, 0, 0), (1, 2, 7), (0, 1, 15)]:
      e[:] = 0
      e[idx] = 1e-6
      fd = (f(x + e) - f(x - e)) / 2e-6
      assert abs(float(fd) - float(g[idx])) < 1e-6 * max(1.0, abs(float(fd)))


def test_gelu_exact_is_torch_gelu():
  """PyTorch's exact GELU values (its erf form), float32 and bfloat16; the gradient is
  jax.nn.gelu(approximate=False)'s."""
  torch = pytest.importorskip('torch')
  x = np.random.RandomState(0).standard_normal(200_000).astype(np.float32) * 4
  ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(gelu_exact(jnp.asarray(x))), ref, rtol=0, atol=2e-6)
  xb = torch.from_numpy(x).to(torch.bfloat16)
  ref_b = torch.nn.functional.gelu(xb).float().numpy()
  ours_b = np.asarray(gelu_exact(jnp.asarray(xb.float().numpy(), jnp.bfloat16)), np.float32)
  # The same values up to bf16 rounding (PyTorch's CPU kernel has its own erf).
  assert np.mean(ours_b == ref_b) > 0.9
  np.testing.assert_allclose(ours_b, ref_b, rtol=2 ** -7, atol=1e-6)
  g = jax.grad(lambda x: gelu_exact(x).sum())(jnp.asarray(x))
  g_ref = jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=1e-5)


def test_gelu_exact_compiles_to_fewer_operations_than_the_erfc_form():
  """The reason it exists: XLA expands erfc into two polynomial branches."""
  def ops(f):
    text = jax.jit(f).lower(jnp.zeros(64, jnp.float32)).compile().as_text()
    return len([line for line in text.splitlines() if ' = ' in line])
  assert ops(gelu_exact) * 2 < ops(lambda x: jax.nn.gelu(x, approximate=False))


def _activation_sized_f32(residuals, size):
  return [r for r in residuals if r.dtype == 'f32' and r.size >= size]


def test_backward_keeps_the_input_only():
  """Not even the row statistics: the backward pass recomputes them from the input, so a
  scanned model stacks nothing for its norms but the stream it keeps anyway."""
  x, scale, bias, _ = _inputs(jnp.bfloat16)
  res = saved_residuals(lambda x: layer_norm(x, scale, bias, 1e-5, jnp.bfloat16)
                        .astype(jnp.float32).sum(), x)
  assert _activation_sized_f32(res, x.size // x.shape[-1]) == []
  assert [r for r in res if r.size >= x.size // x.shape[-1]] == [
      r for r in res if r.dtype == 'bf16' and r.size == x.size]
  # flax's layer keeps float32 copies of the activation (this is what the module avoids).
  res_flax = saved_residuals(lambda x: _flax(x, scale, bias, 1e-5, jnp.bfloat16)
                             .astype(jnp.float32).sum(), x)
  assert len(_activation_sized_f32(res_flax, x.size)) >= 2


def test_recomputed_activation_keeps_its_input_only():
  h = jax.random.normal(jax.random.key(0), (4, 64, 128)).astype(jnp.bfloat16)
  for act in vit.ACTIVATIONS.values():
    f = lambda h: act(h).astype(jnp.float32).sum()
    g = lambda h: recompute_activation(act)(h).astype(jnp.float32).sum()
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(h), np.float32),
                                  np.asarray(jax.grad(g)(h), np.float32))
    big = lambda res: [r for r in res if r.size >= h.size]
    assert len(big(saved_residuals(g, h))) <= 1      # h itself (from the argument)
    assert len(big(saved_residuals(f, h))) >= 2


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_activation_is_dense_then_activation(dtype):
  """Same parameters (names, shapes, initial values) and the same values as nn.Dense
  followed by the activation; gradients equal; the backward keeps the product only."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 10, 32)).astype(dtype)
  init = dict(kernel_init=nn.initializers.normal(0.5), bias_init=nn.initializers.normal(0.5))
  for act in vit.ACTIVATIONS.values():
    ours = DenseActivation(48, activation=act, dtype=dtype, **init)
    ref = nn.Dense(48, dtype=dtype, **init)
    p = ours.init(jax.random.key(1), x)
    p_ref = ref.init(jax.random.key(1), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), p, p_ref))
    f = lambda p, x: ours.apply(p, x)
    g = lambda p, x: act(ref.apply(p, x))
    np.testing.assert_array_equal(np.asarray(f(p, x), np.float32), np.asarray(g(p, x), np.float32))
    loss = lambda fn: (lambda p, x: fn(p, x).astype(jnp.float32).sum())
    for a, b in zip(jax.tree.leaves(jax.grad(loss(f), argnums=(0, 1))(p, x)),
                    jax.tree.leaves(jax.grad(loss(g), argnums=(0, 1))(p, x))):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=1e-5 if dtype == jnp.float32 else 2e-2, atol=1e-5)
    big = [r for r in saved_residuals(loss(f), p, x) if r.size >= 2 * 3 * 10 * 48]
    assert len(big) == 1 and 'dot_general' in big[0].why, big
    plain = DenseActivation(48, activation=act, dtype=dtype, recompute=False, **init)
    np.testing.assert_array_equal(np.asarray(plain.apply(p, x), np.float32),
                                  np.asarray(g(p, x), np.float32))


def test_adapter_and_drop_path_keep_no_activation_sized_intermediates():
  x = jax.random.normal(jax.random.key(1), (2, 4, 16, 64)).astype(jnp.bfloat16)
  ad = Adapter(skip_connect=False, dtype=jnp.bfloat16)
  p = ad.init(jax.random.key(0), x)
  res = saved_residuals(lambda p: ad.apply(p, x).astype(jnp.float32).sum(), p)
  hidden = x.size // 4
  # D_fc2's weight gradient needs the GELU output; D_fc1's the input; nothing else of size.
  assert len([r for r in res if r.size >= hidden]) <= 3, res
  dp = DropPath('token')
  res = saved_residuals(lambda x: dp.apply({}, x, 0.2, False, rngs={'dropout': jax.random.key(3)})
                        .astype(jnp.float32).sum(), x)
  assert [r for r in res if r.size >= x.size and 'argument' not in r.why] == []


@pytest.mark.parametrize('skip', [True, False])
def test_adapter_folds_an_input_offset(skip):
  """Adapter(x, input_offset=c) is Adapter(x + c): c folded into D_fc1's bias (and the
  skip branch) instead of a pass over x; and the attention's output without its bias,
  plus the bias it returns, is its usual output (the pair an adapter folds)."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 10, 64))
  c = jax.random.normal(jax.random.key(1), (64,))
  ad = Adapter(skip_connect=skip)
  p = ad.init(jax.random.key(2), x)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), p)
  np.testing.assert_allclose(ad.apply(p, x, input_offset=c), ad.apply(p, x + c),
                             atol=2e-6, rtol=1e-6)
  for split in ('fused', 'split'):
    attn = vit.MultiHeadAttention(4, qkv_projection=split)
    pa = attn.init(jax.random.key(4), x)
    pa = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), pa)
    for axis in (1, 2):
      y, b = attn.apply(pa, x, axis=axis, fold_out_bias=True)
      np.testing.assert_allclose(y + b, attn.apply(pa, x, axis=axis), atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize('skip', [True, False])
def test_an_adapter_adds_the_residual_stream_to_its_output(skip):
  """Adapter(x, residual=r) is r + Adapter(x): for a skip adapter the stream joins the skip
  branch, for one without it joins D_fc2's bias, at once for a bias vector (no output scale,
  a scalar one) and first (a scale per row, drop path's draw), as D_fc2's product's addend."""
  x, r = (jax.random.normal(jax.random.key(i), (2, 4, 10, 64)) for i in (0, 1))
  c = jax.random.normal(jax.random.key(2), (64,))
  ad = Adapter(skip_connect=skip)
  p = ad.init(jax.random.key(3), x)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape), p)
  per_row = jax.random.uniform(jax.random.key(5), (1, 1, 10, 1)) * 2
  for scale in ((None,) if skip else (None, 0.5, per_row)):
    kw = {} if scale is None else {'output_scale': scale}
    np.testing.assert_allclose(ad.apply(p, x, input_offset=c, residual=r, **kw),
                               r + ad.apply(p, x, input_offset=c, **kw), atol=2e-6, rtol=1e-6)


def test_projection_applies_a_dense_spec_as_one_matrix_product():
  """vit.Projection computes a dense spec ('...C,CO->...O') as one (rows, C) @ (C, O)
  product plus a flat bias (the form XLA gives a cuBLAS epilogue), with einsum's values;
  other specs go through einsum."""
  dense = ('...d,dhk->...hk', '...d,dchk->...chk', '...hk,hkd->...d', '...d,df->...f')
  other = ('...d,hdk->...hk', '...hk,khd->...d', 'bd,df->bf', '...d,dhk->...kh')
  assert [vit._dense_axes(s) for s in dense + other] == [1, 1, 2, 1] + [0] * 4
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
  for spec, kshape, bshape in (('...d,dhk->...hk', (8, 2, 3), (2, 3)),
                               ('...hk,hkd->...d', (4, 8, 6), (6,))):
    proj = vit.Projection(kshape, (None,) * len(kshape), bshape, (None,) * len(bshape))
    p = nn.unbox(proj.init(jax.random.key(1), spec, x))
    p = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), p)
    k, b = p['params']['kernel'], p['params']['bias']
    np.testing.assert_allclose(proj.apply(p, spec, x), jnp.einsum(spec, x, k) + b,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('skip', [False, True])
def test_adapter_reads_its_input_through_a_projection_kernel(skip):
  """Adapter(o, input_offset=c, input_kernel=P) is Adapter(o @ P + c), values and the
  gradients of every parameter (P's too: full fine-tuning trains it); and the attention's
  unprojected output, kernel and bias are its usual output (the triple the block folds)."""
  o = jax.random.normal(jax.random.key(0), (2, 4, 10, 48))
  proj = 0.2 * jax.random.normal(jax.random.key(6), (48, 64))
  c = jax.random.normal(jax.random.key(1), (64,))
  ad = Adapter(skip_connect=skip)
  p = ad.init(jax.random.key(2), o @ proj)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), p)
  assert jax.tree.map(jnp.shape, ad.init(jax.random.key(2), o, input_kernel=proj)) == \
      jax.tree.map(jnp.shape, p)                                    # same parameters
  folded = lambda p, proj: ad.apply(p, o, input_offset=c, input_kernel=proj)
  plain = lambda p, proj: ad.apply(p, o @ proj + c)
  np.testing.assert_allclose(folded(p, proj), plain(p, proj), atol=1e-5, rtol=1e-5)
  loss = lambda f: lambda p, proj: jnp.sum(jnp.sin(f(p, proj)))
  for g_f, g_p in zip(jax.tree.leaves(jax.grad(loss(folded), (0, 1))(p, proj)),
                      jax.tree.leaves(jax.grad(loss(plain), (0, 1))(p, proj))):
    np.testing.assert_allclose(g_f, g_p, atol=1e-4, rtol=1e-4)
  x = jax.random.normal(jax.random.key(7), (2, 4, 10, 64))
  for split in ('fused', 'split'):
    attn = vit.MultiHeadAttention(4, qkv_projection=split)
    pa = attn.init(jax.random.key(4), x)
    pa = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), pa)
    for axis in (1, 2):
      y, kernel, b = attn.apply(pa, x, axis=axis, fold_out_bias=True, project=False)
      assert y.shape == x.shape and kernel.shape == (64, 64)
      np.testing.assert_allclose(y @ kernel + b, attn.apply(pa, x, axis=axis), atol=2e-6,
                                 rtol=1e-6)


def test_the_temporal_branch_has_one_width_by_width_product_fewer():
  """T_Adapter has no skip branch, so the block applies the attention's output projection
  folded into its D_fc1: the block's forward has one (D, D) product fewer than the same
  block without a temporal adapter's fold would (the spatial one keeps its projection)."""
  d = 64
  block = vit.ResidualAttentionBlock(num_heads=4, **AdapterSpec().block_fields(0))
  x = jnp.zeros((2, 4, 10, d))
  params = block.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda p: block.apply(p, x))(params)
  def width_by_width(jaxpr):   # products of an activation with a (D, D) weight
    n = 0
    for e in equations(jaxpr):
      if e.primitive.name == 'dot_general':
        (_, rc), _ = e.params['dimension_numbers']
        rhs = e.invars[1].aval.shape
        contract = int(np.prod([rhs[i] for i in rc]))
        out = int(np.prod([s for i, s in enumerate(rhs) if i not in rc]))
        n += int(contract == d and out == d and e.invars[0].aval.ndim > 2)
    return n
  # The spatial output projection only; without the fold the temporal one too (q, k and v
  # are one (D, 3D) product per attention here).
  assert width_by_width(jaxpr.jaxpr) == 1


def test_drop_path_values_are_timm_order():
  """x / keep * mask, as timm's DropPath (div then multiply by the 0/1 draw)."""
  x = jax.random.normal(jax.random.key(1), (2, 3, 10, 8))
  for mode in ('token', 'frame', 'sample'):
    y = DropPath(mode).apply({}, x, 0.3, False, rngs={'dropout': jax.random.key(5)})
    kept = np.asarray(y != 0)
    np.testing.assert_array_equal(np.asarray(y)[kept], np.asarray(x / 0.7)[kept])
    assert 0 < kept.mean() < 1


def test_scanned_bf16_train_step_stacks_no_float32_activations():
  """The scan stacks what each layer keeps for the backward pass: with these modules no
  float32 tensor of activation size (B*T*L*D) is among them (the L/14 memory fix)."""
  spec = AdapterSpec()
  model = vit.VisionTransformer(patch_size=8, width=64, layers=3, heads=4, image_size=32,
                                num_frames=4, adapters=spec, drop_path_rate=0.1,
                                scan_layers=True, dtype=jnp.bfloat16)
  video = jnp.zeros((2, 4, 32, 32, 3))
  params = model.init(jax.random.key(0), video)['params']
  blocks = params['resblocks']
  trainable = ({k: v for k, v in params.items() if k != 'resblocks'},
               {k: v for k, v in blocks.items() if 'Adapter' in k})
  frozen = {k: v for k, v in blocks.items() if 'Adapter' not in k}
  def loss(tr):
    p = dict(tr[0], resblocks={**frozen, **tr[1]})
    return model.apply({'params': p}, video, train=True,
                       rngs={'dropout': jax.random.key(1)}).astype(jnp.float32).sum()
  act = 2 * 4 * 17 * 64
  saved = saved_residuals(loss, trainable)
  # The XLA attention's float32 softmax (L x L per head) is float32 by design.
  # A stack holds 3 layers: an activation-sized one is >= 3 * act (the float32 stacks of a
  # layer's (D, D) weights, e.g. for Adapter's input_kernel, are smaller).
  offenders = [r for r in _activation_sized_f32(saved, 3 * act) if r.shape[-2:] != (17, 17)]
  assert offenders == []
  assert any(r.dtype == 'bf16' and r.size >= 3 * act for r in saved)   # stacked activations
  # Of the MLP's hidden width (4 x 64, with the joint adapter's 16 beside it: bf16 fuses
  # them, norm.mlp_with_adapter) only the first product is stacked, not the activations'
  # intermediates (recomputed in the backward pass).
  hidden = [r for r in saved if r.shape[-2:] in ((17, 256), (17, 256 + 16))]
  assert len(hidden) == 1 and hidden[0].shape[-2:] == (17, 256 + 16), hidden


def test_adapter_output_scale_is_its_scaled_output_with_the_same_gradients():
  """Adapter(x, output_scale=s) is s * Adapter(x), s a scalar or drop path's factor per token
  (applied to the hidden and D_fc2's bias, norm.ScaledDense): values and every gradient. A
  skip adapter refuses it (its skip branch would not be scaled)."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 10, 32))
  proj = 0.2 * jax.random.normal(jax.random.key(6), (24, 32))
  o = jax.random.normal(jax.random.key(7), (2, 3, 10, 24))
  ad = Adapter(skip_connect=False)
  p = ad.init(jax.random.key(1), x)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p)
  token = jnp.asarray([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], jnp.float32).reshape(1, 1, 10, 1) / 0.7
  for s in (0.5, token, 0.5 * token):
    for kw, arg in (({}, x), ({'input_kernel': proj}, o)):
      scaled = lambda p, a: ad.apply(p, a, output_scale=s, **kw)
      plain = lambda p, a: s * ad.apply(p, a, **kw)
      np.testing.assert_allclose(scaled(p, arg), plain(p, arg), atol=1e-5, rtol=1e-5)
      loss = lambda f: lambda p, a: jnp.sum(jnp.sin(f(p, a)))
      for g_s, g_p in zip(jax.tree.leaves(jax.grad(loss(scaled), (0, 1))(p, arg)),
                          jax.tree.leaves(jax.grad(loss(plain), (0, 1))(p, arg))):
        np.testing.assert_allclose(g_s, g_p, atol=1e-5, rtol=1e-5)
  skip = Adapter(skip_connect=True)
  with pytest.raises(ValueError, match='output_scale'):
    skip.init(jax.random.key(1), x, output_scale=0.5)


def test_drop_path_scale_is_the_draw_its_call_multiplies_by():
  """DropPath.scale(shape, ...) is the factor DropPath(x, ...) multiplies x by (the same
  draw from the same key), None where drop path is the identity; padding is kept."""
  x = jax.random.normal(jax.random.key(1), (2, 3, 12, 8))
  rngs = {'dropout': jax.random.key(5)}
  for mode in ('token', 'frame', 'sample'):
    for valid_len in (None, 10):
      dp = DropPath(mode)
      y = dp.apply({}, x, 0.3, False, valid_len=valid_len, rngs=rngs)
      s = dp.apply({}, x.shape, 0.3, False, valid_len=valid_len, rngs=rngs, method='scale')
      assert s.dtype == jnp.float32 and s.ndim == 4
      np.testing.assert_allclose(np.asarray(x * s), np.asarray(y), rtol=1e-6, atol=1e-7)
      assert 0 < np.mean(np.asarray(s) == 0) < 1
  assert DropPath('token').apply({}, x.shape, 0.3, True, method='scale') is None
  assert DropPath('token').apply({}, x.shape, 0.0, False, method='scale') is None


def test_temporal_drop_path_never_scales_a_full_width_activation():
  """In training, the temporal branch's drop path scales T_Adapter's hidden (D/4 wide) and
  D_fc2's bias: no multiplication of a (B, T, L, D) activation or cotangent by the mask,
  forward or backward (before: one each way per block, ~0.6 ms of a B/16 train step)."""
  d, tokens = 64, 10
  spec = AdapterSpec(spatial=False, joint=False)
  block = vit.ResidualAttentionBlock(num_heads=4, deterministic=False,
                                     **spec.block_fields(0))
  x = jax.random.normal(jax.random.key(0), (2, 4, tokens, d))
  params = block.init(jax.random.key(1), x)
  rngs = {'dropout': jax.random.key(2)}
  loss = lambda p, x: jnp.sum(jnp.sin(block.apply(p, x, 0.4, rngs=rngs)))
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(params, x)

  def mask_scaled(jaxpr):
    """mul equations of full activation shape with a per-token (1, 1, L, 1) operand (the
    drop-path mask, as is or broadcast)."""
    made = {v: e for e in equations(jaxpr) for v in e.outvars}
    n = 0
    for e in equations(jaxpr):
      if e.primitive.name == 'mul' and tuple(e.outvars[0].aval.shape) == x.shape:
        for v in e.invars:
          src = made.get(v)
          if src is not None and src.primitive.name == 'broadcast_in_dim':
            v = src.invars[0]
          n += tuple(getattr(v.aval, 'shape', ())) in ((1, 1, tokens, 1), (1, 1, tokens))
    return n
  assert mask_scaled(jaxpr.jaxpr) == 0
  # The mask is drawn and applied: the step differs from the deterministic block's.
  det = vit.ResidualAttentionBlock(num_heads=4, **spec.block_fields(0))
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), params)
  assert np.abs(np.asarray(block.apply(p, x, 0.4, rngs=rngs) - det.apply(p, x, 0.4))).max() > 1e-3


def test_mlp_with_adapter_is_the_mlp_plus_the_scaled_adapter():
  """norm.mlp_with_adapter (one MLP of width F + A) is x + mlp(xn) + s * adapter(xn):
  values and the gradient of every input, with s a drop-path draw per token."""
  from aim_jax.models.norm import mlp_with_adapter
  x, xn, ws, s = mlp_adapter_inputs()
  def plain(x, xn, w_fc, b_fc, w_proj, b_proj, w_1, b_1, w_2, b_2):
    return (x + (vit.quick_gelu(xn @ w_fc + b_fc) @ w_proj + b_proj)
            + s * (gelu_exact(xn @ w_1 + b_1) @ w_2 + b_2))
  fused = lambda *args: mlp_with_adapter(vit.quick_gelu, gelu_exact, 'xla', *args, s)
  np.testing.assert_allclose(fused(x, xn, *ws), plain(x, xn, *ws), atol=1e-5, rtol=1e-5)
  loss = lambda fn: lambda *args: jnp.sum(jnp.sin(fn(*args)))
  argnums = tuple(range(10))
  for g_f, g_p in zip(jax.grad(loss(fused), argnums)(x, xn, *ws),
                      jax.grad(loss(plain), argnums)(x, xn, *ws)):
    np.testing.assert_allclose(g_f, g_p, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_the_block_fuses_the_joint_adapter_into_its_mlp(scan):
  """fuse_joint_adapter: the same parameters (names, shapes, initial values), the same
  training forward (the same drop-path draws) and gradients as the separate MLP and
  MLP_Adapter; one product of width 4D + D/4 in the forward pass; on by default for
  half-precision compute only."""
  kw = dict(patch_size=8, width=64, layers=2, heads=4, image_size=32, num_frames=4,
            adapters=AdapterSpec(), drop_path_rate=0.3, scan_layers=scan)
  video = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
  models = {f: vit.VisionTransformer(fuse_joint_adapter=f, **kw) for f in (False, True)}
  params = {f: nn.unbox(m.init(jax.random.key(1), video))['params'] for f, m in models.items()}
  assert jax.tree.map(jnp.shape, params[True]) == jax.tree.map(jnp.shape, params[False])
  # The same draws: under scan_layers the initialisers run inside the compiled scan with
  # the forward pass, and XLA:CPU may fuse their arithmetic differently in the two
  # programs, a few float32 roundings apart (seen: 4% of c_fc's kernel, relative 3e-7).
  for a, b in zip(jax.tree.leaves(params[True]), jax.tree.leaves(params[False])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                   params[False])
  rngs = {'dropout': jax.random.key(3)}
  def loss(f):
    return lambda p: jnp.sum(jnp.sin(models[f].apply({'params': p}, video, train=True,
                                                     rngs=rngs)))
  # The loss sums sines of logits of either sign: compared with an absolute tolerance on
  # the scale of its terms (a relative one on a near-cancelled sum fails by rounding alone).
  np.testing.assert_allclose(loss(True)(p), loss(False)(p), rtol=1e-5, atol=1e-5)
  for g_f, g_p in zip(jax.tree.leaves(jax.grad(loss(True))(p)),
                      jax.tree.leaves(jax.grad(loss(False))(p))):
    np.testing.assert_allclose(g_f, g_p, atol=1e-4, rtol=1e-4)
  jaxpr = jax.make_jaxpr(loss(True))(p)
  def products(j):
    return [tuple(e.invars[1].aval.shape) for e in equations(j)
            if e.primitive.name == 'dot_general']
  assert (64, 4 * 64 + 16) in products(jaxpr.jaxpr)
  assert (64, 4 * 64 + 16) not in products(jax.make_jaxpr(loss(False))(p).jaxpr)
  auto = lambda dtype: vit.VisionTransformer(dtype=dtype, **kw).block_kwargs(
      0, True)['fuse_joint_adapter']
  assert auto(jnp.bfloat16) and not auto(jnp.float32)


def test_model_joint_mlp_chooses_the_fusion_and_a_bad_value_names_the_field():
  from aim_jax.models import factory
  fuse = lambda **kw: factory.build_encoder(factory.resolve_model_config(kw),
                                            platform='cpu').fuse_joint_adapter
  assert fuse() is None and fuse(joint_mlp='fused') is True
  assert fuse(joint_mlp='separate', dtype='bfloat16') is False
  assert fuse(backbone='swin', joint_mlp='separate') is False
  with pytest.raises(ValueError, match='model.joint_mlp'):
    factory.resolve_model_config({'joint_mlp': 'yes'})
