"""`model.temporal_attention='pallas'`: AIM's temporal attention as one Pallas kernel each way
(models/temporal_kernel.py), run here in Pallas's interpreter.

The kernels must compute the attention over axis 1 of `(B, T, L, H, hd)` and its three input
gradients as the batched-dot and element-wise forms do (float32 to rounding, bfloat16 within
its own), for any T, a row count that does not fill the last program and a head dim that is
not a power of two; a ViT with them has the same loss and gradients; under a mesh each device
runs the kernels on its own clips; a mesh that splits the model keeps the element-wise form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aim_jax import sharding
from aim_jax.models import fused_norm, temporal_kernel, vit
from tests.model_helpers import equations

RULES = [('activation_batch', ('data', 'fsdp')), ('activation_embed', 'model')]
f32 = lambda a: np.asarray(a, np.float32)


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4)]


# T = 8 (AIM's clips) and an odd 3; 5 x 3 = 15 and 7 x 2 = 14 rows a frame (the last program
# part-filled at the block of 8); head dims 16 and 24 (padded to 32 in the kernel).
@pytest.mark.parametrize('shape', [(2, 8, 5, 3, 16), (1, 3, 7, 2, 24)])
@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_the_kernels_compute_the_temporal_attention_and_its_gradients(shape, dtype, tol):
  q, k, v, dy = _inputs(shape, dtype)
  y_ref, vjp_ref = jax.vjp(vit.attend_over_axis1, q, k, v)
  y, vjp = jax.vjp(lambda q, k, v: temporal_kernel.temporal_attention(q, k, v), q, k, v)
  assert y.dtype == dtype and y.shape == shape
  np.testing.assert_allclose(f32(y), f32(y_ref), atol=tol, rtol=tol)
  for name, got, want in zip('qkv', vjp(dy), vjp_ref(dy)):
    assert got.dtype == dtype and got.shape == shape, name
    np.testing.assert_allclose(f32(got), f32(want), atol=4 * tol, rtol=4 * tol, err_msg=name)
  # The element-wise form (the default's) to its own rounding: the same products and casts.
  y_ew, vjp_ew = jax.vjp(vit.attend_over_axis1_elementwise, q, k, v)
  np.testing.assert_allclose(f32(y), f32(y_ew), atol=tol / 2, rtol=tol / 2)


def test_each_tile_gives_the_same_numbers():
  """The (rows, warps) tile changes only how the rows are cut into programs."""
  q, k, v, dy = _inputs((2, 4, 9, 2, 16), jnp.float32)
  run = lambda tile: jax.vjp(
      lambda q, k, v: temporal_kernel.temporal_attention(q, k, v, None, tile), q, k, v)
  (y1, vjp1), (y2, vjp2) = run((4, 2)), run((16, 4))
  np.testing.assert_allclose(y1, y2, atol=1e-6)
  for a, b in zip(vjp1(dy), vjp2(dy)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_under_a_mesh_each_device_attends_over_its_own_clips():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ('data', 'fsdp', 'model'))
  q, k, v, dy = _inputs((8, 3, 5, 2, 16), jnp.float32)
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  q, k, v, dy = (jax.device_put(a, rows) for a in (q, k, v, dy))

  def fn(q, k, v, dy):
    y, vjp = jax.vjp(vit.temporal_pallas, q, k, v)
    return (y,) + vjp(dy)
  with sharding.mesh_context(mesh, RULES):
    assert fused_norm.row_sharding(q.shape) == ('data', 'fsdp')
    lowered = jax.jit(fn).lower(q, k, v, dy)
    got = lowered.compile()(q, k, v, dy)
  text = lowered.as_text()
  # The kernels run inside the per-device program, on one clip: 3 x 5 x 2 = 30 rows.
  assert 'sdy.manual_computation' in text or 'shard_map' in text
  assert 'tensor<30x16xf32>' in text and 'tensor<240x16xf32>' not in text
  y_ref, vjp_ref = jax.vjp(vit.attend_over_axis1, *(np.asarray(a) for a in (q, k, v)))
  for a, b in zip(got, (y_ref,) + vjp_ref(np.asarray(dy))):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_a_mesh_that_splits_the_model_keeps_the_element_wise_form():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ('data', 'fsdp', 'model'))
  q = jnp.ones((2, 3, 4, 2, 8))
  with sharding.mesh_context(mesh, RULES):
    jaxpr = jax.make_jaxpr(vit.temporal_pallas)(q, q, q)
  assert not any(e.primitive.name == 'pallas_call' for e in equations(jaxpr.jaxpr))
  jaxpr = jax.make_jaxpr(vit.temporal_pallas)(q, q, q)        # no mesh: the kernel
  names = {e.params['name'] for e in equations(jaxpr.jaxpr) if e.primitive.name == 'pallas_call'}
  assert names == {'temporal_attention_fwd'}     # (a branch for the CPU's interpreter and one
                                                 # for the GPU: jax.lax.platform_dependent)


def test_a_bfloat16_vit_with_the_kernel_trains_like_the_element_wise_form():
  """The whole model in bfloat16 (the GPU's program): loss and trainable gradients of the
  Pallas temporal attention against the element-wise one."""
  from aim_jax import params as P_
  from aim_jax.models.factory import build_model
  from test_attention_impl import TINY, _perturbed_params, _video
  cfg = dict(TINY, dtype='bfloat16')
  params = _perturbed_params(cfg)
  video = _video(cfg)

  def loss_and_grads(temporal):
    model = build_model(dict(cfg, temporal_attention=temporal))
    fn = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, video).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(fn))(params)
  (l1, g1), (l2, g2) = loss_and_grads('elementwise'), loss_and_grads('pallas')
  np.testing.assert_allclose(l1, l2, rtol=2e-2, atol=2e-2)
  g1, g2 = P_.flatten(g1), P_.flatten(g2)
  for name in g1:
    scale = float(np.abs(f32(g1[name])).max()) + 1e-6
    assert float(np.abs(f32(g1[name]) - f32(g2[name])).max()) <= 5e-2 * scale, name


def test_the_kernel_benchmark_times_xla_and_each_tile_and_checks_them(tmp_path):
  import json

  from benchmarks import temporal_kernels
  out = tmp_path / 'temporal_kernels.json'
  assert temporal_kernels.main(['--cpu-smoke', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  (shape,) = result['shapes'].values()
  assert shape['shape'] == [2, 4, 5, 3, 16]
  assert shape['bwd_bytes'] == 7 * 2 * 4 * 5 * 3 * 16 * 2
  for row in [shape['xla']] + shape['pallas']:
    assert row['fwd']['ms'] > 0 and row['bwd']['ms'] > 0
  (tile,) = shape['pallas']
  assert tile['tile'] == [temporal_kernel.BLOCK, temporal_kernel.NUM_WARPS]
  assert tile['ok'] and tile['max_abs_diff']['bwd'] <= temporal_kernels.TOLERANCE['bwd']
  assert shape['best']['tile'] == tile['tile']
  with pytest.raises(SystemExit):                  # a tile of one field is refused
    temporal_kernels.main(['--tiles', '8', '--out', str(out)])


def test_a_kernel_benchmark_cut_short_keeps_the_shapes_it_measured(tmp_path):
  """benchmarks/kernel_bench.py writes the JSON after each shape: gpu.sh's time limit (or a
  shape that fails) during the second shape keeps the first's timings."""
  import json

  from benchmarks import kernel_bench
  out = tmp_path / 'k.json'
  calls = []

  def run_shape(n, tiles, iters):
    calls.append(n)
    if n == 2:
      raise KeyboardInterrupt          # as the part's time limit would stop it
    return dict(xla=dict(fwd=dict(ms=1.0)), pallas=[dict(tile=[1, 1], ok=True)])
  with pytest.raises(KeyboardInterrupt):
    kernel_bench.main(['--out', str(out), '--tiles', '1x1'], description='', shapes={
        'first': (1,), 'second': (2,)}, smoke_shapes={}, tiles='1x1', tile_format='AxB',
        tile_example='1x1', smoke_tile=lambda: (1, 1), run_shape=run_shape)
  assert calls == [1, 2]
  assert list(json.loads(out.read_text())['shapes']) == ['first']


# -- 'auto' and the Pallas temporal attention (models/attention_choice.py) -----------------

def _chosen(platform, check=False, **fields):
  from aim_jax.models import attention_choice as AC
  from aim_jax.models.factory import resolve_model_config
  from test_attention_impl import TINY
  cfg = AC.choose(resolve_model_config(dict(TINY, **fields)), platform, check)
  return tuple(cfg[k] for k in AC.FIELDS)


def test_auto_takes_the_temporal_kernel_only_on_the_platforms_listed(monkeypatch, caplog):
  """TEMPORAL_PALLAS_PLATFORMS is empty until a GPU times the kernels faster: then 'auto'
  beside a fused spatial kernel takes them after their device check, else keeps the
  element-wise form with one warning. Explicit fields and float32 are left alone."""
  from aim_jax.models import attention_choice as AC
  assert AC.TEMPORAL_PALLAS_PLATFORMS == ()
  assert _chosen('gpu', dtype='bfloat16') == ('cudnn', 'split', 'elementwise')
  monkeypatch.setattr(AC, 'TEMPORAL_PALLAS_PLATFORMS', ('gpu',))
  monkeypatch.setattr(AC, 'cudnn_check', lambda: (True, ''))
  monkeypatch.setattr(AC, 'temporal_check', lambda: (True, ''))
  monkeypatch.setattr(AC, '_WARNED', set())
  assert _chosen('gpu', True, dtype='bfloat16') == ('cudnn', 'split', 'pallas')
  assert _chosen('gpu', dtype='bfloat16') == ('cudnn', 'split', 'pallas')      # gpu_aot
  assert _chosen('gpu', True, dtype='bfloat16', temporal_attention='elementwise')[2] == (
      'elementwise')
  assert _chosen('gpu', True, dtype='float32') == ('xla', 'fused', 'einsum')
  assert _chosen('cpu', True, dtype='bfloat16') == ('xla', 'fused', 'einsum')
  assert _chosen('gpu', True, dtype='bfloat16', attention_impl='xla')[2] == 'einsum'
  monkeypatch.setattr(AC, 'temporal_check', lambda: (False, 'Triton: out of resources'))
  with caplog.at_level('WARNING'):
    for _ in range(2):
      assert _chosen('gpu', True, dtype='bfloat16') == ('cudnn', 'split', 'elementwise')
  assert caplog.text.count('the Pallas temporal attention failed its check') == 1
  assert 'out of resources' in caplog.text


def test_the_temporal_check_compares_with_the_element_wise_form():
  """On this CPU the interpreted kernels pass; a kernel that computes something else fails
  and says which output differs."""
  from aim_jax.models import attention_choice as AC
  assert AC._compare_temporal_with_xla() == (True, '')
  ok, why = AC._compare_temporal_with_xla(lambda q, k, v: v)
  assert not ok and why.startswith('pallas temporal output differs from XLA by')

  def broken(q, k, v):
    raise RuntimeError('no kernel image is available\nsecond line')
  assert AC._compare_temporal_with_xla(broken) == (
      False, 'RuntimeError: no kernel image is available')
