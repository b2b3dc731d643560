"""`model.mlp_impl='pallas'`: the fused MLP's first product with its bias and activations in
one Pallas kernel (models/fused_mlp.py), run here in Pallas's interpreter.

The kernel must compute what XLA computes (`norm._first_layer`): the product as XLA rounds
it, and both activations of its biased columns; the MLP with it must have the same value
and gradients; a ViT with it the same loss and gradients; under a mesh each device runs it
on its own rows, and a mesh that splits the model keeps XLA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aim_jax import sharding
from aim_jax.models import factory, fused_mlp, fused_norm, norm, vit
from aim_jax.models.norm import gelu_exact, mlp_with_adapter
from tests.model_helpers import equations, mlp_adapter_inputs

RULES = [('activation_batch', ('data', 'fsdp')), ('activation_embed', 'model')]
SMALL_TILE = (32, 32, 16, 2, 4, 2)   # several row and column blocks, two row blocks a group


def _kernels(fn, *args):
  return [e.params.get('name') for e in equations(jax.make_jaxpr(fn)(*args).jaxpr)
          if e.primitive.name == 'pallas_call']


def _layer_inputs(m, k, f, a, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (m, k)).astype(dtype)
  w = (0.3 * jax.random.normal(ks[1], (k, f + a))).astype(dtype)
  b = (0.3 * jax.random.normal(ks[2], (f + a,))).astype(dtype)
  s = jax.random.uniform(ks[3], (m,))
  return x, w, b, s


def test_the_kernels_erf_is_erf():
  x = jnp.linspace(-6.0, 6.0, 20001)
  # Within 5e-7 of XLA's float32 erf (itself 3.6e-7 off erf(4.5) = 1 - 2e-10).
  np.testing.assert_allclose(fused_mlp._erf(x), jax.lax.erf(x), atol=6e-7, rtol=0)
  np.testing.assert_allclose(fused_mlp._gelu_exact(x), gelu_exact(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('tile', [SMALL_TILE, None], ids=['small_tile', 'default_tile'])
def test_the_kernel_computes_xlas_first_layer_with_masked_edges(dtype, tile):
  # 80 rows and 72 columns: neither a multiple of the tile; the adapter's 8 columns share a
  # column block with the MLP's.
  m, k, f, a = 80, 32, 64, 8
  x, w, b, s = _layer_inputs(m, k, f, a, dtype)
  acts = (vit.quick_gelu, gelu_exact)
  hidden, y = jax.jit(lambda *args: fused_mlp.first_layer(*args, f, *acts, True, tile))(
      x, w, b, s)
  hidden_ref, y_ref = norm._first_layer(*acts, 'xla', True, x, w, b, s[:, None], f)
  only_hidden = jax.jit(lambda *args: fused_mlp.first_layer(*args, f, *acts, False, tile))(
      x, w, b, s)
  assert len(only_hidden) == 1 and hidden.dtype == y.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(only_hidden[0], hidden)
  f32 = lambda v: np.asarray(v, np.float32)
  if dtype == 'float32':
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(hidden, hidden_ref, atol=1e-5, rtol=1e-5)
  else:
    # The same float32 sums rounded once: the product as XLA writes it; the activations
    # within one rounding of the output (XLA rounds after each operation of the formula).
    np.testing.assert_allclose(f32(y), f32(y_ref), atol=2e-2, rtol=8e-3)
    np.testing.assert_allclose(f32(hidden), f32(hidden_ref), atol=2e-2, rtol=8e-3)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_the_gradient_kernel_computes_xlas_hidden_gradient(dtype):
  """fused_mlp.hidden_gradient: `(g @ w.T) * slopes(y + b)` with the adapter's columns
  times the row's scale, as norm._hidden_gradient computes it with XLA, edges masked."""
  m, d, f, a = 80, 32, 64, 8
  ks = jax.random.split(jax.random.key(1), 5)
  g = jax.random.normal(ks[0], (m, d)).astype(dtype)
  w_out = (0.3 * jax.random.normal(ks[1], (f + a, d))).astype(dtype)
  b = (0.3 * jax.random.normal(ks[2], (f + a,))).astype(dtype)
  y = jax.random.normal(ks[3], (m, f + a)).astype(dtype)
  s = jax.random.uniform(ks[4], (m,))
  acts = (vit.quick_gelu, gelu_exact)
  dz = jax.jit(lambda *args: fused_mlp.hidden_gradient(*args, f, *acts, SMALL_TILE))(
      g, w_out.T, b, s, y)
  dz_ref = norm._hidden_gradient(*acts, 'xla', g, w_out, b, y, s[:, None], f)[0]
  assert dz.dtype == jnp.dtype(dtype)
  f32 = lambda v: np.asarray(v, np.float32)
  if dtype == 'float32':
    np.testing.assert_allclose(dz, dz_ref, atol=1e-5, rtol=1e-5)
  else:
    np.testing.assert_allclose(f32(dz), f32(dz_ref), atol=3e-2, rtol=2e-2)


def test_the_input_width_must_be_a_multiple_of_the_tiles_k_step():
  x, w, b, s = _layer_inputs(8, 24, 16, 4, 'float32')
  with pytest.raises(ValueError, match='input width 24'):
    fused_mlp.first_layer(x, w, b, s, 16, vit.quick_gelu, gelu_exact, False, SMALL_TILE)


def test_the_mlp_with_the_kernel_has_the_xla_value_and_gradients():
  """norm.mlp_with_adapter with impl='pallas': the same value without differentiation
  (where the kernel writes only the activations) and the same gradient of every input."""
  x, xn, ws, s = mlp_adapter_inputs()
  fn = {impl: functools.partial(mlp_with_adapter, vit.quick_gelu, gelu_exact, impl)
        for impl in ('xla', 'pallas')}
  value = {impl: jax.jit(lambda *args, f=f: f(*args, s))(x, xn, *ws) for impl, f in fn.items()}
  np.testing.assert_allclose(value['pallas'], value['xla'], atol=1e-5, rtol=1e-5)
  assert _kernels(lambda *args: fn['pallas'](*args, s), x, xn, *ws) == ['mlp_matmul_act'] * 2
  loss = lambda impl: lambda *args: jnp.sum(jnp.sin(fn[impl](*args, s)))
  grads = {impl: jax.jit(jax.grad(loss(impl), tuple(range(10))))(x, xn, *ws)
           for impl in fn}
  # The backward pass has the hidden's gradient kernel (the slopes in its epilogue).
  assert 'mlp_matmul_slope' in _kernels(jax.grad(loss('pallas'), 1), x, xn, *ws)
  for g_p, g_x in zip(grads['pallas'], grads['xla']):
    np.testing.assert_allclose(g_p, g_x, atol=5e-5, rtol=1e-5)


def _vit(impl, **kw):
  cfg = dict(width=32, layers=2, heads=2, patch_size=16, image_size=32, num_frames=2,
             num_classes=3, joint_mlp='fused', mlp_impl=impl, **kw)
  return factory.build_model(cfg)


def test_a_vit_with_the_pallas_mlp_has_the_same_loss_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 2, 32, 32, 3))
  models = {impl: _vit(impl, drop_path_rate=0.3) for impl in ('xla', 'pallas')}
  params = models['xla'].init(jax.random.key(1), x)

  def loss(impl):
    # train=True: drop path draws the same masks from the same stream either way.
    return lambda p: jnp.sum(models[impl].apply(p, x, train=True,
                                                rngs={'dropout': jax.random.key(2)}) ** 2)
  (l_x, g_x), (l_p, g_p) = (jax.jit(jax.value_and_grad(loss(i)))(params) for i in models)
  np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_p), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # Two kernels per block, the first layer forward and the hidden's gradient backward (each
  # twice: the compiled kernel and the interpreter, by lowering platform); none with XLA's.
  assert sorted(_kernels(jax.grad(loss('pallas')), params)) == (
      ['mlp_matmul_act'] * 2 * 2 + ['mlp_matmul_slope'] * 2 * 2)
  assert _kernels(jax.grad(loss('xla')), params) == []


def test_under_a_mesh_each_device_runs_the_kernel_on_its_own_rows():
  devices = np.array(jax.devices()[:8]).reshape(4, 2, 1)
  mesh = Mesh(devices, ('data', 'fsdp', 'model'))
  d, f, a = 32, 64, 8
  xn = jax.random.normal(jax.random.key(0), (8, 3, 5, d))
  _, w, b, _ = _layer_inputs(1, d, f, a, 'float32')
  xn = jax.device_put(xn, NamedSharding(mesh, P(('data', 'fsdp'))))
  acts = (vit.quick_gelu, gelu_exact)
  fn = lambda xn: norm._first_layer(*acts, 'pallas', True, xn, w, b, 0.5, f)
  with sharding.mesh_context(mesh, RULES):
    lowered = jax.jit(fn).lower(xn)
    hidden, y = lowered.compile()(xn)
  text = lowered.as_text()
  # The kernel runs inside the per-device program, on a device's 8 / 8 = 1 clip (15 rows).
  assert 'sdy.manual_computation' in text or 'shard_map' in text
  assert 'tensor<15x32xf32>' in text and 'tensor<120x32xf32>' not in text
  assert hidden.sharding.spec[0] == ('data', 'fsdp')
  hidden_ref, y_ref = norm._first_layer(*acts, 'xla', True, np.asarray(xn), w, b, 0.5, f)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(hidden, hidden_ref, atol=1e-5, rtol=1e-5)


def test_a_mesh_that_splits_the_model_keeps_xlas_product():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ('data', 'fsdp', 'model'))
  x, w, b, _ = _layer_inputs(2 * 3, 8, 16, 4, 'float32')
  xn = x.reshape(2, 3, 8)
  with sharding.mesh_context(mesh, RULES):
    assert fused_norm.row_sharding(xn.shape) == fused_norm.KEEP_XLA
    fn = lambda xn: norm._first_layer(vit.quick_gelu, gelu_exact, 'pallas', False, xn, w, b,
                                      1.0, 16)
    assert _kernels(fn, xn) == []


def test_model_mlp_impl_is_checked_and_auto_is_xla():
  assert factory.mlp_impl(factory.resolve_model_config({})) == 'xla'
  fused = {'mlp_impl': 'pallas', 'joint_mlp': 'fused'}
  assert factory.mlp_impl(factory.resolve_model_config(fused)) == 'pallas'
  with pytest.raises(ValueError, match='model.mlp_impl'):
    factory.resolve_model_config({'mlp_impl': 'triton'})
  with pytest.raises(ValueError, match="model.mlp_impl='pallas' is for ViT backbones"):
    factory.resolve_model_config({**fused, 'backbone': 'swin', 'variant': ''})
  # In float32 'auto' keeps the MLP and the joint adapter apart: no fused product to run.
  with pytest.raises(ValueError, match="model.joint_mlp='auto' with model.dtype='float32'"):
    factory.resolve_model_config({'mlp_impl': 'pallas', 'dtype': 'float32'})
  assert factory.mlp_impl(factory.resolve_model_config(
      {'mlp_impl': 'pallas', 'dtype': 'float32', 'joint_mlp': 'fused'})) == 'pallas'
  with pytest.raises(ValueError, match="model.mlp_impl='pallas' runs Triton kernels"):
    factory.build_encoder(fused, platform='tpu')
  assert _vit('auto').backbone.mlp_impl == 'xla'
  assert _vit('pallas').backbone.mlp_impl == 'pallas'


def test_the_kernel_benchmark_times_xla_and_each_tile_and_checks_them(tmp_path, capsys):
  import json
  from benchmarks import mlp_kernels
  out = tmp_path / 'mlp_kernels.json'
  assert mlp_kernels.main(['--cpu-smoke', '--out', str(out)]) == 0
  r = json.loads(out.read_text())['shapes']['tiny']
  assert set(r['xla']) == {'train', 'eval', 'bwd'} and r['xla']['bwd']['ms'] > 0
  (tile,) = r['pallas']
  assert tile['tile'] == list(fused_mlp.TILE) and tile['ok']
  assert max(tile['max_abs_diff'].values()) <= mlp_kernels.TOLERANCE
  assert r['best']['tile'] == list(fused_mlp.TILE) and set(r['best']['vs_xla']) == {'train', 'bwd',
                                                                                       'eval'}
  with pytest.raises(SystemExit):
    mlp_kernels.main(['--tiles', '128x128', '--out', str(out)])
  assert 'BMxBNxBKxGROUPxWARPSxSTAGES' in capsys.readouterr().err
