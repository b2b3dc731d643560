"""`model.norm_impl='pallas'`: the blocks' LayerNorms as one Pallas kernel each way
(models/fused_norm.py), run here in Pallas's interpreter.

The kernels must compute `norm.layer_norm` (flax's LayerNorm) and its gradient plus the
residual stream's cotangent; a ViT with them must have the same parameters, loss and
gradients as with XLA's norms; under a mesh each device must run the kernel on its own rows;
a mesh that splits the model over devices keeps XLA's norm.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aim_jax import sharding
from aim_jax.models import factory, fused_norm, norm
from aim_jax.models.norm import LayerNorm
from tests.model_helpers import equations

RULES = [('activation_batch', ('data', 'fsdp')), ('activation_embed', 'model')]


def _inputs(shape, dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  d = shape[-1]
  x = (jax.random.normal(k[0], shape) * 2 + 0.5).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(k[1], (d,))
  bias = 0.2 * jax.random.normal(k[2], (d,))
  dy = jax.random.normal(k[3], shape).astype(dtype)
  dstream = jax.random.normal(k[4], shape).astype(dtype)
  return x, scale, bias, dy, dstream


def _reference_vjp(x, scale, bias, dy, dstream, dtype):
  """(x, layer_norm(x)) through XLA and its vjp with cotangents (dstream, dy)."""
  fn = lambda x, s, b: (x, norm.layer_norm(x, s, b, 1e-5, dtype))
  out, vjp = jax.vjp(fn, x, scale, bias)
  return out, vjp((dstream, dy))


def _fused_vjp(x, scale, bias, dy, dstream, dtype, batch_axes=None):
  fn = lambda x, s, b: fused_norm.residual_layer_norm(x, s, b, 1e-5, dtype, batch_axes)
  out, vjp = jax.vjp(fn, x, scale, bias)
  return out, vjp((dstream, dy))


# 2 x 3 x 7 = 42 rows (not a multiple of ROWS = 8: a part-filled last program) of width 96
# (padded to 128 inside the kernel).
SHAPE = (2, 3, 7, 96)


def test_the_kernels_compute_the_xla_layer_norm_and_its_gradient_with_the_stream():
  x, scale, bias, dy, dstream = _inputs(SHAPE)
  (x_ref, y_ref), grads_ref = jax.jit(functools.partial(_reference_vjp, dtype=jnp.float32))(
      x, scale, bias, dy, dstream)
  (x_out, y), grads = jax.jit(functools.partial(_fused_vjp, dtype=jnp.float32))(
      x, scale, bias, dy, dstream)
  assert x_out is not None and np.array_equal(x_out, x)
  np.testing.assert_allclose(y, y_ref, atol=2e-6, rtol=1e-6)
  for name, got, want in zip(('dx', 'dscale', 'dbias'), grads, grads_ref):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)
  # The stream's cotangent is in dx: without it, dx moves by exactly dstream.
  (_, _), (dx0, _, _) = jax.jit(functools.partial(_fused_vjp, dtype=jnp.float32))(
      x, scale, bias, dy, jnp.zeros_like(dstream))
  np.testing.assert_allclose(grads[0] - dx0, dstream, atol=2e-5)


def test_copies_of_the_output_have_their_cotangents_summed_in_the_kernel():
  x, scale, bias, dy, dstream = _inputs(SHAPE)
  dys = [dy, 0.5 * dy + 1, jnp.cos(dy)]
  fn = lambda x, s, b: fused_norm.residual_layer_norm(x, s, b, 1e-5, jnp.float32, None, 3)
  out, vjp = jax.vjp(fn, x, scale, bias)
  assert len(out) == 4 and out[1] is out[2] is out[3]
  grads = jax.jit(vjp)((dstream, *dys))
  _, grads_ref = _reference_vjp(x, scale, bias, sum(dys), dstream, jnp.float32)
  for name, got, want in zip(('dx', 'dscale', 'dbias'), grads, grads_ref):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5, err_msg=name)
  # One backward kernel reads the three cotangents (no XLA sum before it).
  jaxpr = jax.make_jaxpr(vjp)((dstream, *dys))
  (call, *_) = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == 'pallas_call']
  assert len(call.invars) == 1 + 3 + 1 + 3     # x, three cotangents, the stream's, scale, stats


def test_the_row_statistics_are_float32_and_the_outputs_take_the_compute_dtype():
  x, scale, bias, dy, dstream = _inputs((5, 40), jnp.bfloat16)
  (_, y), (dx, dscale, dbias) = _fused_vjp(x, scale, bias, dy, dstream, jnp.bfloat16)
  assert y.dtype == dx.dtype == jnp.bfloat16
  assert dscale.dtype == dbias.dtype == jnp.float32
  (_, y_ref), (dx_ref, _, _) = _reference_vjp(x, scale, bias, dy, dstream, jnp.bfloat16)
  f32 = lambda a: np.asarray(a, np.float32)
  # The same float32 arithmetic, rounded to bfloat16 once (XLA's program adds the stream's
  # cotangent after rounding the norm's): a bfloat16 step apart at most.
  np.testing.assert_allclose(f32(y), f32(y_ref), atol=3e-2, rtol=1e-2)
  np.testing.assert_allclose(f32(dx), f32(dx_ref), atol=6e-2, rtol=2e-2)


def _vit(impl, dtype='float32', **kw):
  cfg = dict(width=32, layers=2, heads=2, patch_size=16, image_size=32, num_frames=2,
             num_classes=3, dtype=dtype, norm_impl=impl, **kw)
  return factory.build_model(cfg)


def test_a_vit_with_pallas_norms_has_the_same_parameters_loss_and_gradients():
  # The split q/k/v projection (the GPU's): ln_1 hands out three copies, ln_2 one; both
  # backward kernels are in the program.
  x = jax.random.normal(jax.random.key(0), (2, 2, 32, 32, 3))
  models = {impl: _vit(impl, drop_path_rate=0.3, qkv_projection='split')
            for impl in ('xla', 'pallas')}
  params = {impl: m.init(jax.random.key(1), x) for impl, m in models.items()}
  assert jax.tree.map(np.shape, params['xla']) == jax.tree.map(np.shape, params['pallas'])
  for a, b in zip(jax.tree.leaves(params['xla']), jax.tree.leaves(params['pallas'])):
    np.testing.assert_array_equal(a, b)

  def loss_and_grad(impl):
    m = models[impl]
    # train=True: drop path draws the same masks from the same stream either way.
    loss = lambda p: jnp.sum(m.apply(p, x, train=True, rngs={'dropout': jax.random.key(2)}) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params['xla'])

  (l_x, g_x), (l_p, g_p) = loss_and_grad('xla'), loss_and_grad('pallas')
  np.testing.assert_allclose(l_p, l_x, rtol=1e-6)
  flat_x = dict(jax.tree_util.tree_leaves_with_path(g_x))
  flat_p = dict(jax.tree_util.tree_leaves_with_path(g_p))
  assert flat_x.keys() == flat_p.keys()
  for path in flat_x:
    np.testing.assert_allclose(flat_p[path], flat_x[path], atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  # The Pallas program has the kernels: three norms of the stream per block, each way (each
  # twice in the program: the compiled kernel and the interpreter, by lowering platform).
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(models['pallas'].apply(p, x))))(
      params['xla'])
  names = [e.params.get('name', '') for e in equations(jaxpr.jaxpr)
           if e.primitive.name == 'pallas_call']
  assert names.count('layer_norm_fwd') == names.count('layer_norm_bwd') == 3 * 2 * 2
  # Split, ln_1's backward kernels read q, k and v's cotangents apart (3 + 5 operands).
  arity = sorted(len(e.invars) for e in equations(jaxpr.jaxpr)
                 if e.primitive.name == 'pallas_call' and e.params['name'] == 'layer_norm_bwd')
  assert arity == [6] * 4 + [8] * 8


def test_under_a_mesh_each_device_normalises_its_own_rows():
  devices = np.array(jax.devices()[:8]).reshape(4, 2, 1)
  mesh = Mesh(devices, ('data', 'fsdp', 'model'))
  x, scale, bias, dy, dstream = _inputs((8, 3, 5, 48))
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  x, dy, dstream = (jax.device_put(a, rows) for a in (x, dy, dstream))
  with sharding.mesh_context(mesh, RULES):
    assert fused_norm.row_sharding(x.shape) == ('data', 'fsdp')
    assert fused_norm.row_sharding((4, 3, 48)) is None     # 8 devices cannot split 4 clips
    ln = LayerNorm(epsilon=1e-5, impl='pallas')
    params = ln.init(jax.random.key(0), x[:1], stream=True)
    params = {'params': {'scale': scale, 'bias': bias}}

    def fn(x, dy, dstream):
      out, vjp = jax.vjp(lambda x: ln.apply(params, x, stream=True), x)
      return out[1], vjp((dstream, dy))[0]
    lowered = jax.jit(fn).lower(x, dy, dstream)
    y, dx = lowered.compile()(x, dy, dstream)
  text = lowered.as_text()
  # The kernels run inside the per-device program, on a device's 8 / 8 = 1 clip (15 rows).
  assert 'sdy.manual_computation' in text or 'shard_map' in text
  assert 'tensor<15x48xf32>' in text and 'tensor<120x48xf32>' not in text
  assert y.sharding.spec[0] == ('data', 'fsdp') and dx.sharding.spec[0] == ('data', 'fsdp')
  (_, y_ref), (dx_ref, _, _) = _reference_vjp(*(np.asarray(a) for a in (x, scale, bias, dy,
                                                                      dstream)), jnp.float32)
  np.testing.assert_allclose(y, y_ref, atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('rules', [RULES, [('activation_batch', ('data', 'fsdp')),
                                            ('activation_embed', None),
                                            ('activation_mlp', 'model')]],
                         ids=['width_split', 'model_axis'])
def test_a_mesh_that_splits_the_model_keeps_the_xla_norm(rules):
  """A 'model' axis of more than one device (the width split, or only the MLP's hidden as in
  configs/common.py): XLA's norm, which XLA partitions with the rest of the step."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ('data', 'fsdp', 'model'))
  with sharding.mesh_context(mesh, rules):
    assert fused_norm.row_sharding((2, 3, 8)) == fused_norm.KEEP_XLA
    x = jnp.ones((2, 3, 8))
    ln = LayerNorm(impl='pallas')
    params = ln.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda x: ln.apply(params, x, stream=True))(x)
  assert not any(e.primitive.name == 'pallas_call' for e in equations(jaxpr.jaxpr))


def test_without_a_mesh_or_with_one_device_the_kernel_runs_on_every_row():
  assert fused_norm.row_sharding((2, 3, 8)) is None
  with sharding.mesh_context(Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                  ('data', 'fsdp', 'model')), RULES):
    assert fused_norm.row_sharding((2, 3, 8)) is None
    x = jnp.ones((2, 3, 8))
    ln = LayerNorm(impl='pallas')
    params = ln.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda x: ln.apply(params, x, stream=True))(x)
  assert any(e.primitive.name == 'pallas_call' for e in equations(jaxpr.jaxpr))


def test_model_norm_impl_is_checked_and_auto_is_xla():
  assert factory.norm_impl(factory.resolve_model_config({})) == 'xla'
  assert factory.norm_impl(factory.resolve_model_config({'norm_impl': 'pallas'})) == 'pallas'
  with pytest.raises(ValueError, match='model.norm_impl'):
    factory.resolve_model_config({'norm_impl': 'triton'})
  with pytest.raises(ValueError, match="model.norm_impl='pallas' is for ViT backbones"):
    factory.resolve_model_config({'norm_impl': 'pallas', 'backbone': 'swin', 'variant': ''})
  assert _vit('auto').backbone.norm_impl == 'xla'
  with pytest.raises(ValueError, match="model.norm_impl='pallas' runs Triton kernels"):
    factory.build_encoder({'norm_impl': 'pallas'}, platform='tpu')
  assert _vit('pallas').backbone.norm_impl == 'pallas'
  # A plain call (ln_pre, ln_post, a MAP head) is XLA's, whatever the impl.
  ln = LayerNorm(impl='pallas')
  x = jnp.ones((3, 8))
  params = ln.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda x: ln.apply(params, x))(x)
  assert not any(e.primitive.name == 'pallas_call' for e in equations(jaxpr.jaxpr))


def test_the_stream_call_of_the_xla_norm_is_the_plain_norm():
  ln = LayerNorm(epsilon=1e-5)
  x, *_ = _inputs(SHAPE)
  params = ln.init(jax.random.key(0), x)
  x_out, y = ln.apply(params, x, stream=True)
  assert x_out is x
  np.testing.assert_array_equal(y, ln.apply(params, x))


def test_the_kernel_benchmark_times_xla_and_each_tile_and_checks_them(tmp_path, capsys):
  from benchmarks import norm_kernels
  out = tmp_path / 'norm_kernels.json'
  assert norm_kernels.main(['--cpu-smoke', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  (shape,) = result['shapes'].values()
  assert (shape['rows'], shape['width'], shape['copies']) == (40, 96, 3)
  assert shape['bwd_bytes'] == 6 * 40 * 96 * 2
  for row in [shape['xla']] + shape['pallas']:
    assert row['fwd']['ms'] > 0 and row['bwd']['ms'] > 0
  (tile,) = shape['pallas']
  assert tile['ok'] and tile['max_abs_diff']['bwd'] <= norm_kernels.TOLERANCE['bwd']
  assert shape['best']['tile'] == tile['tile']
  # The device check 'auto' runs before it takes the kernels (models/kernel_choice.py).
  assert result['auto_check'] == {'ok': True, 'why': ''}
  from aim_jax.models import kernel_choice
  with pytest.MonkeyPatch.context() as mp:       # a check that fails makes the status 1
    mp.setattr(kernel_choice, 'compare_with_xla', lambda: (False, 'loss differs'))
    assert norm_kernels.main(['--cpu-smoke', '--out', str(out)]) == 1
  assert json.loads(out.read_text())['auto_check'] == {'ok': False, 'why': 'loss differs'}
  # The timings are written before the check: a check cut short (a time limit) keeps them.
  out.unlink()

  def cut_short():
    raise KeyboardInterrupt

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(kernel_choice, 'compare_with_xla', cut_short)
    with pytest.raises(KeyboardInterrupt):
      norm_kernels.main(['--cpu-smoke', '--out', str(out)])
  result = json.loads(out.read_text())
  assert result['shapes'] and 'auto_check' not in result
  with pytest.raises(SystemExit):
    norm_kernels.main(['--tiles', '8', '--out', str(out)])
  assert '--tiles' in capsys.readouterr().err
