"""The GPU compile without a GPU (`benchmarks.gpu_aot`) and the HLO reader under it
(`benchmarks.hlo_kernels`), and `step_benchmark --variant`.

The reader is checked on programs compiled here on the CPU (a scan, a dot, a
transpose: their FLOPs, bytes and launch counts are known) and on an excerpt of
GPU HLO written the way XLA's GPU compiler prints it (a cuDNN attention call, two
identical fusions, a transpose fusion). The compile for an H200 runs where JAX's
CUDA plugin is installed (no GPU needed); elsewhere the tool must say in one line
what is missing.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo_kernels as H
from benchmarks import step_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_cuda_plugin() -> bool:
  try:
    import jax_plugins.xla_cuda13  # noqa: F401
    return True
  except ImportError:
    return False


def test_kernels_of_a_cpu_program_count_scan_launches_flops_and_bytes():
  def f(x, w):
    y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
    return y.T + 1
  text = jax.jit(f).lower(jnp.ones((64, 32)), jnp.ones((32, 32))).compile().as_text()
  ks = H.kernels(text)
  gemm = [k for k in ks if k.family == 'gemm']
  assert len(gemm) == 1 and gemm[0].launches == 5          # once per scan iteration
  assert gemm[0].flops == 2 * 64 * 32 * 32
  assert gemm[0].bytes_out == 64 * 32 * 4 and gemm[0].bytes_in == (64 * 32 + 32 * 32) * 4
  last = [k for k in ks if k.launches == 1 and k.bytes_out == 32 * 64 * 4 and k.bytes_in]
  assert last and last[-1].family == 'transpose/copy'        # the y.T + 1 fusion
  s = H.summarize(ks)
  assert s['families']['gemm']['gflop'] == pytest.approx(5 * 2 * 64 * 32 * 32 / 1e9, abs=1e-3)
  assert s['launches'] == sum(k.launches for k in ks)
  assert s['predicted_ms'] == pytest.approx(
      1e3 * sum(H.predict_s(k) * k.launches for k in ks), abs=1e-3)


def test_element_wise_arithmetic_is_counted_and_can_bound_a_kernel():
  """`elem_ops`: one per element of each computing operation in a fusion. XLA's expansion
  of erfc makes the exact GELU in erfc form several times the arithmetic of the erf form
  (the measured H200 kernel was bound by it), and `predict_s` takes the larger bound."""
  from aim_jax.models.norm import gelu_exact
  n = 1 << 16
  def ops(f):
    text = jax.jit(f).lower(jnp.ones((n,), jnp.float32)).compile().as_text()
    return sum(k.elem_ops for k in H.kernels(text))
  erfc_form, erf_form = ops(lambda x: jax.nn.gelu(x, approximate=False)), ops(gelu_exact)
  assert erf_form >= 3 * n and erfc_form > 2 * erf_form
  assert ops(lambda x: x + 1.0) == n
  k = H.Kernel(name='loop_fusion', op='fusion', family='elementwise', shape='f32[1]',
               bytes_in=42_000_000, bytes_out=0, flops=0.0, launches=1, group='g', where='w')
  assert H.predict_s(k) == pytest.approx(42e6 / H.RATES['elementwise']['bytes_s'])  # 10 us
  k.elem_ops = 400e6                                                # 20 us at 20 T/s
  assert H.predict_s(k) == pytest.approx(400e6 / H.RATES['elementwise']['ops_s'])


def test_a_scan_stacks_its_residuals_in_place_one_slice_per_step():
  """The backward of a scan reads and writes its stacked residuals one step at a time: a
  dynamic-update-slice fusion writes one slice (in place), a dynamic-slice reads one."""
  def loss(w, x):
    y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=16)
    return jnp.sum(y)
  text = jax.jit(jax.grad(loss)).lower(jnp.ones((32, 32)), jnp.ones((64, 32))).compile().as_text()
  sliced = [k for k in H.kernels(text) if 'dynamic' in k.name]
  assert sliced and all(k.launches == 16 for k in sliced)
  one = 64 * 32 * 4
  for k in sliced:
    assert one <= k.bytes_out <= one + 64 and k.bytes_in <= one + 64, (k.name, k.bytes_in,
                                                                       k.bytes_out)


def test_a_fusion_reads_only_the_part_of_an_operand_its_slices_need():
  """A GPU fusion computes each output element from the input elements it needs: the
  backward's fusion that takes the adapter's 192 columns out of the 3,264-wide hidden (after
  adding its bias) reads those columns of both hiddens, not all of them; the element-wise
  work is counted on those columns too. A parameter also used whole is read whole."""
  with open(os.path.join(ROOT, 'tests', 'hlo', 'sliced_fusion.hlo')) as f:
    text = f.read()
  by = {k.name: k for k in H.kernels(text)}
  cols = 4096 * 192
  k = by['input_multiply_reduce_fusion_8']
  assert k.bytes_in == 2 * cols * 2 + 3264 * 2    # two column slices; the bias (broadcast) whole
  assert k.bytes_out == 16 * 192 * 4 + cols * 2
  # add, exponential, multiply, convert on the columns; the reduce reads them
  assert k.elem_ops == 5 * cols
  k = by['loop_add_fusion_3']          # q1 is also added whole: read whole, once
  assert k.bytes_in == 2 * 4096 * 3264 * 2
  assert by['slice_9'].bytes_in == by['slice_9'].bytes_out == 8 * 192 * 2


def test_a_data_parallel_program_has_its_all_reduce_as_a_collective_kernel():
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.make_mesh((len(jax.devices()),), ('d',))
  n = len(jax.devices())
  f = jax.jit(lambda x: jnp.sum(x * 2, axis=0),
              in_shardings=NamedSharding(mesh, PartitionSpec('d')),
              out_shardings=NamedSharding(mesh, PartitionSpec()))
  text = f.lower(jax.ShapeDtypeStruct((8 * n, 128), jnp.float32)).compile().as_text()
  (reduce,) = [k for k in H.kernels(text) if k.family == 'collective']
  assert reduce.op.startswith('all-reduce') and reduce.bytes == 2 * 128 * 4   # in + out


# GPU HLO as XLA prints it: names, shapes and attributes of a B/16 train step compiled for an
# H200, cut down to five kernels.
GPU_HLO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hlo', 'gpu_step_excerpt.hlo')


def test_xla_triton_fusions_are_told_apart_and_get_their_own_rate():
  """A fusion XLA emits as a Triton kernel (kind kCustom, fusion kind "__triton": the
  LayerNorms of the bf16 step) streams at RATES['elementwise']['triton_bytes_s'] (2.1 TB/s
  measured on the H200), a loop fusion of the same bytes at 'bytes_s' (3.3)."""
  with open(GPU_HLO) as f:
    text = f.read()
  triton = text.replace(
      'kind=kLoop, calls=%fused_add.2',
      'kind=kCustom, calls=%fused_add.2, backend_config={"fusion_backend_config":'
      '{"kind":"__triton","block_level_fusion_config":{"num_warps":"8"}}}')
  assert triton != text
  plain = {k.name: k for k in H.kernels(text)}
  ks = {k.name: k for k in H.kernels(triton)}
  assert not plain['loop_add_fusion_2'].triton and ks['loop_add_fusion_2'].triton
  assert not ks['loop_add_fusion_1'].triton and not ks['gemm_fusion_dot_5'].triton
  import dataclasses
  big = lambda k: dataclasses.replace(k, bytes_in=k.bytes_in * 1000, elem_ops=0.0)  # no floor
  k, p = big(ks['loop_add_fusion_2']), big(plain['loop_add_fusion_2'])
  assert H.predict_s(k) == pytest.approx(k.bytes / H.RATES['elementwise']['triton_bytes_s'])
  assert H.predict_s(p) == pytest.approx(p.bytes / H.RATES['elementwise']['bytes_s'])


def test_kernels_of_gpu_hlo_families_flops_groups_and_places():
  with open(GPU_HLO) as f:
    ks = {k.name: k for k in H.kernels(f.read())}
  assert set(ks) == {'gemm_fusion_dot_5', 'dot_product_attention_fwd_1',
                     'input_transpose_fusion_50', 'loop_add_fusion_1', 'loop_add_fusion_2'}
  assert {n: k.family for n, k in ks.items()} == {
      'gemm_fusion_dot_5': 'gemm', 'dot_product_attention_fwd_1': 'attention',
      'input_transpose_fusion_50': 'transpose/copy', 'loop_add_fusion_1': 'elementwise',
      'loop_add_fusion_2': 'elementwise'}
  assert ks['gemm_fusion_dot_5'].flops == 2 * 197 * 512 * 512
  # Attention forward: QK^T and PV on (B, S, H, D) = (8, 200, 12, 64).
  assert ks['dot_product_attention_fwd_1'].flops == 2 * (2 * 8 * 12 * 200 * 200 * 64)
  assert ks['input_transpose_fusion_50'].bytes == 2 * (8 * 197 * 64 * 2)
  # Two fusions with the same computation (but other names and metadata): one kernel.
  assert ks['loop_add_fusion_1'].group == ks['loop_add_fusion_2'].group
  assert ks['loop_add_fusion_1'].group != ks['gemm_fusion_dot_5'].group
  assert ks['gemm_fusion_dot_5'].where == 'mlp/c_fc fwd'
  assert ks['input_transpose_fusion_50'].where == 'attn/pad bwd'
  # A measured profile lines up by kernel name; the shared kernel covers both launches.
  rows = H.match_profile(list(ks.values()), {'loop_add_fusion_1': 0.05, 'nvjet_sm90_x': 1.0})
  assert [(r['name'], r['launches'], r['measured_ms']) for r in rows] == [
      ('loop_add_fusion_1', 2, 0.05)]
  assert rows[0]['predicted_ms'] == pytest.approx(
      2e3 * max(ks['loop_add_fusion_1'].bytes / H.RATES['elementwise']['bytes_s'], H.LAUNCH_S))


def test_a_zero_fill_that_xla_removed_is_no_kernel():
  """With `compiler_options` (configs/common.py) XLA's GPU compiler replaces the zero fill of
  a stack that a loop writes in full by an AllocateBuffer call: no kernel, no bytes."""
  text = """HloModule m

%fill (p.0: bf16[]) -> bf16[24,64,128] {
  %p.0 = bf16[] parameter(0)
  ROOT %b.0 = bf16[24,64,128]{2,1,0} broadcast(%p.0), dimensions={}
}

ENTRY %main (x.1: bf16[]) -> (bf16[24,64,128], bf16[24,64,128]) {
  %x.1 = bf16[] parameter(0)
  %custom-call.11 = bf16[24,64,128]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"
  %b.1 = bf16[24,64,128]{2,1,0} fusion(%x.1), kind=kLoop, calls=%fill
  ROOT %t.1 = (bf16[24,64,128]{2,1,0}, bf16[24,64,128]{2,1,0}) tuple(%custom-call.11, %b.1)
}
"""
  (k,) = H.kernels(text)
  assert k.name == 'b_1' and k.bytes_out == 24 * 64 * 128 * 2


def test_a_library_matrix_product_has_its_flops():
  """A product XLA hands to cuBLAS (`--xla_gpu_enable_triton_gemm=false`, or the autotuner's
  choice) is a custom call: its FLOPs come from the backend config's contracting dimensions,
  and the residual it adds in place (beta = 1, the aliased third operand) is read."""
  config = json.dumps({'operation_queue_id': '0', 'gemm_backend_config': {
      'selected_algorithm': '0', 'alpha_real': 1, 'beta': 1, 'dot_dimension_numbers': {
          'lhs_contracting_dimensions': ['1'], 'rhs_contracting_dimensions': ['0'],
          'lhs_batch_dimensions': [], 'rhs_batch_dimensions': []}}}, separators=(',', ':'))
  name = 'jit(train_step)/jvp(M)/backbone/resblocks_0/mlp/c_proj/dot_general'
  text = f"""HloModule m

ENTRY %main (a.1: bf16[1024,3072], w.1: bf16[3072,768], c.1: bf16[1024,768]) -> bf16[1024,768] {{
  %a.1 = bf16[1024,3072]{{1,0}} parameter(0)
  %w.1 = bf16[3072,768]{{1,0}} parameter(1)
  %c.1 = bf16[1024,768]{{1,0}} parameter(2)
  %cublas-lt-matmul.7 = (bf16[1024,768]{{1,0}}, s8[4194304]{{0}}) custom-call(%a.1, %w.1, %c.1), \
custom_call_target="__cublas$lt$matmul", output_to_operand_aliasing={{{{0}}: (2, {{}})}}, \
metadata={{op_name="{name}"}}, backend_config={config}
  ROOT %g.1 = bf16[1024,768]{{1,0}} get-tuple-element(%cublas-lt-matmul.7), index=0
}}
"""
  (k,) = H.kernels(text)
  assert k.family == 'gemm' and k.where == 'mlp/c_proj fwd'
  assert k.flops == 2 * 1024 * 768 * 3072
  assert k.bytes_in == (1024 * 3072 + 3072 * 768 + 1024 * 768) * 2
  assert k.bytes_out == 1024 * 768 * 2         # not the call's s8 scratch workspace
  assert H.predict_s(k) == pytest.approx(max(k.flops / H.RATES['gemm']['flops_s'],
                                             k.bytes / H.RATES['gemm']['bytes_s']))


def test_a_library_product_in_a_dynamic_slice_fusion_is_one_gemm_on_the_slices():
  """With `xla_gpu_enable_dynamic_slice_fusion`, a cuBLAS call that reads a layer's weight
  out of a scan's stack and writes its product into another stack is a custom fusion around
  the call: one GEMM launch per loop step, with the call's FLOPs, reading the weight's slice
  and writing the product's slice (not the stacks), and no scratch workspace."""
  config = json.dumps({'gemm_backend_config': {'dot_dimension_numbers': {
      'lhs_contracting_dimensions': ['1'], 'rhs_contracting_dimensions': ['0']}}},
      separators=(',', ':'))
  fusion = json.dumps({'fusion_backend_config': {'kind': '__custom_fusion', 'custom_fusion_config':
                                                 {'name': 'dynamic_slice_fusion'}}},
                      separators=(',', ':'))
  name = 'jit(train_step)/jvp(M)/backbone/while/body/resblocks/attn/qkv/dot_general'
  state = '(s32[], bf16[512,256]{1,0}, bf16[4,256,128]{2,1,0}, bf16[4,512,128]{2,1,0})'
  text = f"""HloModule m

%dsf.1 (x.2: bf16[512,256], ws.2: bf16[4,256,128], ys.2: bf16[4,512,128], i.2: s32[]) \
-> (bf16[4,512,128], s8[33554432]) {{
  %x.2 = bf16[512,256]{{1,0}} parameter(0)
  %ws.2 = bf16[4,256,128]{{2,1,0}} parameter(1)
  %ys.2 = bf16[4,512,128]{{2,1,0}} parameter(2)
  %i.2 = s32[] parameter(3)
  %z.2 = s32[] constant(0)
  %w.2 = bf16[1,256,128]{{2,1,0}} dynamic-slice(%ws.2, %i.2, %z.2, %z.2), \
dynamic_slice_sizes={{1,256,128}}
  %wb.2 = bf16[256,128]{{1,0}} bitcast(%w.2)
  %mm.2 = (bf16[512,128]{{1,0}}, s8[33554432]{{0}}) custom-call(%x.2, %wb.2), \
custom_call_target="__cublas$lt$matmul", metadata={{op_name="{name}"}}, backend_config={config}
  %y.2 = bf16[512,128]{{1,0}} get-tuple-element(%mm.2), index=0
  %yb.2 = bf16[1,512,128]{{2,1,0}} bitcast(%y.2)
  %up.2 = bf16[4,512,128]{{2,1,0}} dynamic-update-slice(%ys.2, %yb.2, %i.2, %z.2, %z.2)
  %s.2 = s8[33554432]{{0}} get-tuple-element(%mm.2), index=1
  ROOT %t.2 = (bf16[4,512,128]{{2,1,0}}, s8[33554432]{{0}}) tuple(%up.2, %s.2)
}}

%body.3 (p.3: (s32[], bf16[512,256], bf16[4,256,128], bf16[4,512,128])) \
-> (s32[], bf16[512,256], bf16[4,256,128], bf16[4,512,128]) {{
  %p.3 = {state} parameter(0)
  %i.3 = s32[] get-tuple-element(%p.3), index=0
  %x.3 = bf16[512,256]{{1,0}} get-tuple-element(%p.3), index=1
  %ws.3 = bf16[4,256,128]{{2,1,0}} get-tuple-element(%p.3), index=2
  %ys.3 = bf16[4,512,128]{{2,1,0}} get-tuple-element(%p.3), index=3
  %dynamic_slice_fusion.3 = (bf16[4,512,128]{{2,1,0}}, s8[33554432]{{0}}) fusion(%x.3, %ws.3, \
%ys.3, %i.3), kind=kCustom, calls=%dsf.1, backend_config={fusion}
  %new.3 = bf16[4,512,128]{{2,1,0}} get-tuple-element(%dynamic_slice_fusion.3), index=0
  ROOT %r.3 = {state} \
tuple(%i.3, %x.3, %ws.3, %new.3)
}}

ENTRY %main (p.4: (s32[], bf16[512,256], bf16[4,256,128], bf16[4,512,128])) \
-> (s32[], bf16[512,256], bf16[4,256,128], bf16[4,512,128]) {{
  %p.4 = {state} parameter(0)
  ROOT %w.4 = {state} \
while(%p.4), condition=%body.3, body=%body.3, backend_config={{"known_trip_count":{{"n":"4"}}}}
}}
"""
  (k,) = H.kernels(text)
  assert (k.name, k.family, k.launches, k.where) == ('dynamic_slice_fusion_3', 'gemm', 4,
                                                     'attn/qkv fwd')
  assert k.flops == 2 * 512 * 128 * 256
  assert k.bytes_in == (512 * 256 + 256 * 128) * 2 and k.bytes_out == 512 * 128 * 2
  summary = H.summarize([k])
  assert summary['families']['gemm']['gflop'] == pytest.approx(4 * k.flops / 1e9, abs=1e-3)


def test_a_pallas_kernel_is_filed_by_its_name():
  """A Pallas Triton call (`__gpu$xla.gpu.triton`) is named by its `pallas_call(name=...)` in
  the op name: the LayerNorm kernels of `model.norm_impl='pallas'` are reductions, as a
  measured profile files `layer_norm_fwd`; a name that says nothing stays 'other'."""
  def program(op_name):
    return f"""HloModule m

ENTRY %main (x.1: bf16[1024,768], s.1: f32[768]) -> bf16[1024,768] {{
  %x.1 = bf16[1024,768]{{1,0}} parameter(0)
  %s.1 = f32[768]{{0}} parameter(1)
  ROOT %t.1 = bf16[1024,768]{{1,0}} custom-call(%x.1, %s.1, %s.1), \
custom_call_target="__gpu$xla.gpu.triton", metadata={{op_name="{op_name}"}}
}}
"""
  name = 'jit(train_step)/jvp(M)/backbone/resblocks_3/ln_1/layer_norm_fwd/pallas_call'
  (k,) = H.kernels(program(name))
  assert k.family == 'reduction' and k.where == 'ln_1 fwd'
  assert k.bytes_in == 1024 * 768 * 2 + 2 * 768 * 4 and k.bytes_out == 1024 * 768 * 2
  (k,) = H.kernels(program('jit(f)/backbone/resblocks_3/ln_1/pallas_call'))
  assert k.family == 'other'


def test_a_pallas_matrix_product_has_its_flops():
  """A Pallas kernel a profile files as a GEMM by its name (fused_mlp's `mlp_matmul_act`):
  2 x M x K x N of its (M, K) and (K, N) operands; a Pallas norm kernel has none."""
  def program(name):
    return f"""HloModule m

ENTRY %main (x.1: bf16[1024,768], w.1: bf16[768,3264], b.1: bf16[3264]) -> bf16[1024,3264] {{
  %x.1 = bf16[1024,768]{{1,0}} parameter(0)
  %w.1 = bf16[768,3264]{{1,0}} parameter(1)
  %b.1 = bf16[3264]{{0}} parameter(2)
  ROOT %t.1 = bf16[1024,3264]{{1,0}} custom-call(%x.1, %w.1, %b.1), \
custom_call_target="__gpu$xla.gpu.triton", metadata={{op_name="{name}"}}
}}
"""
  (k,) = H.kernels(program('jit(f)/backbone/resblocks_3/mlp/mlp_matmul_act/pallas_call'))
  assert k.family == 'gemm' and k.flops == 2 * 1024 * 768 * 3264 and k.pallas_gemm
  assert k.where == 'mlp/mlp_matmul_act fwd'
  # --pallas_speed: the kernel's product at a fraction of XLA's GEMM speed
  many = dataclasses.replace(k, launches=1000)   # a total that the summary's rounding keeps
  at = {f: H.summarize([many], pallas_speed=f)['predicted_ms'] for f in (1.0, 0.5)}
  assert at[0.5] == pytest.approx(2 * at[1.0], rel=1e-3)
  with pytest.raises(ValueError, match='pallas_speed'):
    H.summarize([k], pallas_speed=0)
  (n,) = H.kernels(program('jit(f)/backbone/resblocks_3/ln_1/layer_norm_fwd/pallas_call'))
  assert n.family == 'reduction' and n.flops == 0 and not n.pallas_gemm
  assert H.summarize([n], pallas_speed=0.5)['predicted_ms'] == H.summarize([n])['predicted_ms']


def test_hlo_without_an_entry_is_refused():
  with pytest.raises(ValueError, match='ENTRY'):
    H.kernels('HloModule m\n')


def test_the_command_line_lists_families_and_top_kernels_and_names_a_bad_file(tmp_path, capsys):
  assert H.main([GPU_HLO, '--top', '2']) == 0
  s = json.loads(capsys.readouterr().out)
  assert set(s['families']) == {'gemm', 'attention', 'transpose/copy', 'elementwise'}
  assert len(s['top_kernels']) == 2 and s['launches'] == 5
  bad = tmp_path / 'bad.hlo'
  bad.write_text('HloModule m\n')
  for path in (bad, tmp_path / 'missing.hlo'):
    assert H.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and str(path) in err, err
  with pytest.raises(SystemExit) as e:          # a usage error: exit 2, naming the option
    H.main([GPU_HLO, '--pallas_speed', '1.5'])
  assert e.value.code == 2 and '--pallas_speed' in capsys.readouterr().err


def test_parse_variant_sets_typed_fields_on_a_copy():
  from ml_collections import config_dict
  cfg = config_dict.ConfigDict(dict(model=dict(attention_impl='', scan_layers=False, layers=12,
                                               drop_path_rate=0.1)))
  name, v = step_benchmark.parse_variant(
      'fast:model.attention_impl=cudnn,model.scan_layers=true,model.layers=4,'
      'model.drop_path_rate=0', cfg)
  assert name == 'fast' and v.model.attention_impl == 'cudnn' and v.model.scan_layers is True
  assert v.model.layers == 4 and v.model.drop_path_rate == 0.0
  assert cfg.model.attention_impl == '' and cfg.model.layers == 12     # the original stays
  for bad, msg in [('fast', 'NAME:FIELD=VALUE'), ('fast:model.layers', 'not FIELD=VALUE'),
                   ('fast:model.nope=1', 'no field model.nope'),
                   ('fast:model.layers=x', 'model.layers takes int'),
                   ('fast:model.scan_layers=yes', 'true or false')]:
    with pytest.raises(ValueError, match=msg):
      step_benchmark.parse_variant(bad, cfg)


def _run(args, timeout=600, xla_flags=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  if args[0] == 'benchmarks.gpu_aot':   # the tests' XLA:CPU flags are not the GPU compiler's
    env.pop('XLA_FLAGS', None)
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  return subprocess.run([sys.executable, '-m'] + args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_step_benchmark_variant_rows_and_a_failing_variant_keeps_its_error(tmp_path):
  out = tmp_path / 'v.json'
  p = _run(['benchmarks.step_benchmark', '--config', 'configs/tiny.py', '--mode', 'eval',
            '--batch', '8', '--steps', '2', '--warmup', '0',
            '--variant', 'elementwise:model.temporal_attention=elementwise',
            '--variant', 'cudnn:model.attention_impl=cudnn', '--out', str(out)])
  assert p.returncode == 0, p.stderr[-2000:]
  rows = json.load(open(out))['results']
  assert [r['variant'] for r in rows] == ['default', 'elementwise', 'cudnn']
  assert rows[1]['clips_per_s'] > 0 and rows[1]['program_memory_bytes'] > 0
  assert 'error' in rows[2] and 'cudnn' in rows[2]['overrides']   # no cuDNN on a CPU
  assert '| eval [elementwise] |' in p.stdout
  bad = _run(['benchmarks.step_benchmark', '--config', 'configs/tiny.py',
              '--variant', 'x:model.attention_pad_mode=once'])
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "step_benchmark: --variant 'x:model.attention_pad_mode=once': model.attention_pad_mode "
      "must be one of ['stream', 'call'], got 'once'")


@pytest.mark.skipif(_has_cuda_plugin(), reason='checks the message of a jax without CUDA')
def test_gpu_aot_without_the_cuda_plugin_says_so_in_one_line():
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/tiny.py'])
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
      'gpu_aot: this jax has no CUDA plugin to compile with: pip install "jax[cuda13]" '
      '(no GPU needed)')


def test_gpu_aot_names_an_unknown_target():
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/tiny.py', '--target', 'h9000'])
  assert p.returncode == 2
  assert 'gpu_aot: --target h9000: no ' in p.stderr and '(known: h200)' in p.stderr


@pytest.mark.skipif(not _has_cuda_plugin(), reason='needs JAX\'s CUDA plugin (no GPU needed)')
def test_gpu_aot_compiles_the_tiny_step_for_an_h200(tmp_path):
  out = tmp_path / 'aot.json'
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/tiny.py', '--mode', 'train', '--batch',
            '8', '--config.model.dtype=bfloat16', '--variant',
            'pallas:model.attention_impl=pallas,model.norm_impl=pallas,model.mlp_impl=pallas',
            '--variant', 'temporal_pallas:model.temporal_attention=pallas',
            '--out', str(out),
            '--hlo_dir', str(tmp_path / 'variants')])
  assert p.returncode == 0, p.stderr[-2000:]
  rows = json.load(open(out))['rows']
  assert [r['variant'] for r in rows] == ['default', 'pallas', 'temporal_pallas']
  assert rows[0]['attention'] == dict(attention_impl='cudnn', qkv_projection='split',
                                      temporal_attention='elementwise')
  assert rows[1]['attention']['attention_impl'] == 'pallas'
  # The Pallas LayerNorm kernels compile for the H200 and are filed as reductions.
  with open(tmp_path / 'variants' / 'pallas_train.hlo') as f:
    ks = H.kernels(f.read())
  norms = [k for k in ks if k.op == 'custom-call' and k.where.startswith(('ln_1', 'ln_2'))]
  assert {k.family for k in norms} == {'reduction'}
  assert {k.where for k in norms} >= {'ln_1 fwd', 'ln_1 bwd', 'ln_2 fwd', 'ln_2 bwd'}
  # So does the fused MLP's first layer, filed as a GEMM with its FLOPs.
  mlps = [k for k in ks if k.op == 'custom-call' and k.where.startswith('mlp')]
  assert mlps and {k.family for k in mlps} == {'gemm'} and min(k.flops for k in mlps) > 0
  # And the temporal attention's kernels (models/temporal_kernel.py), filed as attention by
  # their name, one forward and one backward launch per layer.
  with open(tmp_path / 'variants' / 'temporal_pallas_train.hlo') as f:
    temporal = [k for k in H.kernels(f.read()) if k.name.startswith('pallas_call')]
  assert {k.family for k in temporal} == {'attention'}
  assert sum(k.launches for k in temporal) == 2 * 2        # configs/tiny.py: 2 layers
  # XLA's own Triton fusions (the LayerNorms of the default program) are told apart: their
  # rate is hlo_kernels.RATES['elementwise']['triton_bytes_s'].
  for r in rows:
    assert 'H200' in r['device_kind'] and r['program_memory_bytes'] > 0
    assert r['predicted_step_ms'] > 0 and r['families']['gemm']['gflop'] > 0
  # A profile from the GPU (kernels.json of step_benchmark --profile) lines up by name.
  hlo = tmp_path / 'hlo'
  args = ['benchmarks.gpu_aot', '--config', 'configs/tiny.py', '--batch', '8',
          '--config.model.dtype=bfloat16', '--hlo_dir', str(hlo), '--out', str(out)]
  assert _run(args).returncode == 0
  with open(hlo / 'default_train.hlo') as f:
    text = f.read()
  # model.attention_impl='auto' chose cuDNN for the H200 (bfloat16), without running its check.
  assert '__cudnn$fmha' in text
  name = max(H.kernels(text), key=lambda k: k.bytes).name
  measured = tmp_path / 'kernels.json'
  measured.write_text(json.dumps({'kernels_ms_per_step': {name: 0.25, 'nvjet_x': 1.0}}))
  assert _run(args + ['--measured', str(measured)]).returncode == 0
  (row,) = json.load(open(out))['rows'][0]['measured']
  assert row['name'] == name and row['measured_ms'] == 0.25 and row['predicted_ms'] > 0


@pytest.mark.skipif(not _has_cuda_plugin(), reason='needs JAX\'s CUDA plugin (no GPU needed)')
def test_the_default_compiler_options_remove_the_zero_fill_of_a_scanned_step(tmp_path):
  """configs/common.py's compiler_options reach the GPU compile of the train step: the
  scanned step's residual stacks are not zero-filled (fewer bytes), the memory about the same."""
  out, hlo = tmp_path / 'aot.json', tmp_path / 'hlo'
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/tiny.py', '--batch', '8',
            '--config.model.dtype=bfloat16', '--config.model.scan_layers=True',
            '--variant', 'no_options:compiler_options=', '--out', str(out),
            '--hlo_dir', str(hlo)])
  assert p.returncode == 0, p.stderr[-2000:]
  rows = {r['variant']: r for r in json.load(open(out))['rows']}
  texts = {v: (hlo / f'{v}_train.hlo').read_text() for v in rows}
  assert 'AllocateBuffer' in texts['default'] and 'AllocateBuffer' not in texts['no_options']
  gb = {v: sum(f['gb'] for f in r['families'].values()) for v, r in rows.items()}
  assert gb['default'] < gb['no_options']
  assert rows['default']['program_memory_bytes'] == pytest.approx(
      rows['no_options']['program_memory_bytes'], rel=0.01)


@pytest.mark.skipif(not _has_cuda_plugin(), reason='needs JAX\'s CUDA plugin (no GPU needed)')
def test_the_default_compiler_options_keep_cublas_products_of_a_scan_single(tmp_path):
  """With its products on cuBLAS (what the GPU's autotuner may choose), XLA's dynamic-slice
  fusion rewrites the scanned step's products that read or fill a layer stack, cloning a
  product that has another user; configs/common.py's compiler_options turn it off, so the
  step's GEMM FLOPs are those of the Triton program."""
  from configs import tiny
  cublas = 'xla_gpu_enable_triton_gemm=false'
  out, hlo = tmp_path / 'aot.json', tmp_path / 'hlo'
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/tiny.py', '--batch', '8',
            '--config.model.dtype=bfloat16', '--config.model.scan_layers=True',
            f'--config.compiler_options={tiny.get_config().compiler_options},{cublas}',
            '--variant', f'xla_default:compiler_options={cublas}',
            '--variant', 'triton:compiler_options=xla_gpu_enable_triton_gemm=true',
            '--out', str(out), '--hlo_dir', str(hlo)])
  assert p.returncode == 0, p.stderr[-2000:]
  rows = {r['variant']: r for r in json.load(open(out))['rows']}
  texts = {v: (hlo / f'{v}_train.hlo').read_text() for v in rows}
  assert '"dynamic_slice_fusion"' not in texts['default']
  assert '"dynamic_slice_fusion"' in texts['xla_default']
  assert '__cublas' in texts['default'] and '__cublas' not in texts['triton']
  gflop = {v: r['families']['gemm']['gflop'] for v, r in rows.items()}
  assert gflop['default'] == pytest.approx(gflop['triton'], rel=1e-6)
  assert gflop['xla_default'] > gflop['default'] * 1.05


def _row(mode, clips, variant='default', **kw):
  return dict(mode=mode, variant=variant, clips_per_s=clips, devices=1, step_s_median=64 / clips,
              program_memory_bytes=int(40 * 2 ** 30), mfu=clips / 1000, compile_s=30.0, **kw)


def test_gpu_report_checks_each_target_and_never_passes_a_missing_figure(tmp_path):
  from benchmarks import gpu_report
  prof = lambda share: {'families': {'transpose/copy': {'share': share}}}
  train = dict(complete=True, results=[
      _row('train', 250.0, profile=prof(0.23)),
      _row('train', 440.0, 'cudnn', profile=prof(0.01), attention={'attention_impl': 'cudnn'}),
      dict(mode='train', variant='pallas', error='RuntimeError: no plan')],
      official=[dict(mode='train', official_mode='eager', clips_per_s=160.0, step_s_median=0.4),
                dict(mode='train', official_mode='compiled', clips_per_s=263.0,
                     step_s_median=0.24, peak_memory_bytes=int(43.9 * 2 ** 30))])
  (tmp_path / 'b16_train.json').write_text(json.dumps(train))
  (tmp_path / 'l14_train.json').write_text(json.dumps({'results': [
      _row('train', 80.0), dict(mode='train', variant='cudnn', error='OOM')]}))
  (tmp_path / 'cudnn_attention.json').write_text(json.dumps(
      {'implementation': 'cudnn', 'padded': {'ok': True}}))
  unrolled = lambda compile_s: json.dumps({'results': [
      dict(_row('train', 110.0), compile_s=compile_s)]})
  (tmp_path / 'l14_unrolled.json').write_text(unrolled(75.0))
  rep = gpu_report.report(str(tmp_path))
  by = {c['target']: c for c in rep['checks']}
  assert by['train: fastest row (cudnn) / official compiled']['status'] == 'met'
  assert by['train: fastest row (cudnn) / official compiled']['shown'] == '1.67x'
  assert by['train: fastest row (cudnn) / official eager']['status'] == 'met'
  assert by['train: transposes and copies, share of kernel time (cudnn)']['status'] == 'met'
  assert by['train: memory (cudnn) / official compiled peak']['status'] == 'met'
  assert by['train: MFU aim (cudnn)']['status'] == 'missed'            # 44% < 45%
  assert by['eval: fastest row / official compiled']['status'] == 'not measured'   # no file
  assert by['L/14: slowest compile of its rows']['status'] == 'not measured'   # a row failed
  assert by['L/14: slowest compile of its rows']['note'] == 'cudnn: OOM'
  unrolled_check = 'L/14 unrolled (model.scan_layers=False): slowest compile'
  assert (by[unrolled_check]['status'], by[unrolled_check]['shown']) == ('missed', '75 s')
  assert by['cuDNN attention, padded, forward + backward = XLA']['status'] == 'met'
  assert not any(t.startswith('Pallas flash attention') for t in by)    # cuDNN passed
  kernels_check = "Pallas LayerNorm and MLP kernels: 'auto''s device check"
  assert by[kernels_check]['status'] == 'not measured'                  # no norm_kernels.json
  (tmp_path / 'norm_kernels.json').write_text(json.dumps(
      {'shapes': {}, 'auto_check': {'ok': False, 'why': 'loss differs from XLA by 0.4'}}))
  by = {c['target']: c for c in gpu_report.report(str(tmp_path))['checks']}
  assert (by[kernels_check]['status'], by[kernels_check]['note']) == (
      'missed', 'loss differs from XLA by 0.4')
  table = gpu_report.format_report(rep)
  assert rep['restart'] is None and 'A restart' not in table          # no compile_cache.json
  (tmp_path / 'compile_cache.json').write_text(json.dumps({'rows': [
      dict(run='first', lower_s=2.5, compile_s=1.2, loaded=1, stored=0),
      dict(run='second', lower_s=2.1, compile_s=0.9, loaded=1, stored=0)]}))
  restarted = gpu_report.report(str(tmp_path))
  assert restarted['restart'] == dict(lower_s=2.1, load_s=0.9, compile_s=30.0)
  assert ('A restart (compilation cache): the B/16 train step traced in 2.1 s and loaded in '
          '0.9 s, where b16_train compiled it in 30.0 s') in gpu_report.format_report(restarted)
  assert '| aim_jax [pallas] | train | RuntimeError: no plan |' in table
  assert '| aim_jax [cudnn] (cudnn attention) | train | 440.0 |' in table
  assert '| official compiled | train | 263.0 |' in table
  assert '| aim_jax [default] | L/14 train | 80.0 | 800.0 |' in table
  assert '| aim_jax [cudnn] | L/14 train | OOM |' in table
  assert '| aim_jax [unrolled] | L/14 train | 110.0 |' in table
  (tmp_path / 'l14_unrolled.json').write_text(unrolled(41.0))
  by = {c['target']: c for c in gpu_report.report(str(tmp_path))['checks']}
  assert by[unrolled_check]['status'] == 'met'
  (tmp_path / 'l14_unrolled.json').unlink()
  by = {c['target']: c for c in gpu_report.report(str(tmp_path))['checks']}
  assert by[unrolled_check]['status'] == 'not measured'
  p = _run(['benchmarks.gpu_report', str(tmp_path / 'missing')])
  assert p.returncode == 2 and 'no such folder' in p.stderr
  # cuDNN failed its check: 'auto' tried the Pallas kernel, whose own part ran (or died).
  pallas_check = 'Pallas flash attention, padded, forward + backward = XLA'
  (tmp_path / 'cudnn_attention.json').write_text(json.dumps(
      {'implementation': 'cudnn', 'padded': {'ok': False, 'error': 'no plan'},
       'auto_check': {'ok': False, 'pallas': {'ok': True, 'why': ''}, 'choice': 'pallas'}}))
  by = {c['target']: c for c in gpu_report.report(str(tmp_path))['checks']}
  assert by['cuDNN attention, padded, forward + backward = XLA']['status'] == 'missed'
  assert by[pallas_check]['status'] == 'not measured'                  # no JSON: it died
  (tmp_path / 'pallas_attention.json').write_text(json.dumps(
      {'implementation': 'pallas', 'padded': {'ok': True}}))
  by = {c['target']: c for c in gpu_report.report(str(tmp_path))['checks']}
  assert (by[pallas_check]['status'], by[pallas_check]['shown']) == ('met', 'True')


def test_gpu_report_puts_the_predicted_step_beside_each_row_it_stands_for(tmp_path):
  """--predicted: a gpu_aot row goes beside the measured row of the same mode, batch, devices,
  attention kernel and kind (pallas_kernels, unrolled, or plain, whatever the variant's name)."""
  from benchmarks import gpu_report
  cudnn, pallas = ({'attention_impl': a} for a in ('cudnn', 'pallas'))
  (tmp_path / 'b16_train.json').write_text(json.dumps({'results': [
      _row('train', 400.0, batch=64, attention=cudnn),                   # 160 ms
      _row('train', 500.0, 'pallas_kernels', batch=64, attention=cudnn),
      _row('train', 300.0, 'xla', batch=64, attention={'attention_impl': 'xla'})]}))
  (tmp_path / 'l14_unrolled.json').write_text(json.dumps({'results': [
      _row('train', 100.0, batch=32, attention=cudnn)]}))
  aot = lambda variant, mode, batch, att, ms: dict(variant=variant, mode=mode, batch=batch,
                                                   devices=1, attention=att,
                                                   predicted_step_ms=ms)
  pred = tmp_path / 'aot.json'
  pred.write_text(json.dumps({'rows': [
      aot('default', 'train', 64, cudnn, 128.0), aot('pallas_kernels', 'train', 64, cudnn, 120.0),
      aot('pallas', 'train', 64, pallas, 150.0), aot('default', 'eval', 64, cudnn, 53.0),
      aot('unrolled', 'train', 32, cudnn, 262.0), aot('default', 'train', 32, cudnn, 321.0)]}))
  rows = {(r['impl'], r['mode']): r for r in
          gpu_report.report(str(tmp_path), (str(pred),))['rows']}
  default = rows[('aim_jax [default] (cudnn attention)', 'train')]
  assert default['predicted_ms'] == 128.0
  assert default['measured_vs_predicted'] == pytest.approx(160.0 / 128.0)
  assert rows[('aim_jax [pallas_kernels] (cudnn attention)', 'train')]['predicted_ms'] == 120.0
  assert rows[('aim_jax [xla] (xla attention)', 'train')]['predicted_ms'] is None   # none given
  unrolled = rows[('aim_jax [unrolled] (cudnn attention)', 'L/14 train')]
  assert unrolled['predicted_ms'] == 262.0                   # not the scanned default's 321
  table = gpu_report.format_report(gpu_report.report(str(tmp_path), (str(pred),)))
  assert '| aim_jax [default] (cudnn attention) | train | 400.0 | 160.0 | 40.0 | 40.0% | 30.0 | ' \
         '128.0 | 1.25 |' in table
  p = _run(['benchmarks.gpu_report', str(tmp_path), '--predicted',
            str(tmp_path / 'b16_train.json')])
  assert p.returncode == 2 and p.stderr.startswith('gpu_report: --predicted ')
  assert 'b16_train.json: not a benchmarks.gpu_aot output' in p.stderr


@pytest.mark.skipif(not _has_cuda_plugin(), reason='needs JAX\'s CUDA plugin (no GPU needed)')
def test_cublas_products_take_the_biases_and_residual_adds_of_the_steps(tmp_path):
  """With its products on cuBLAS (what the H200's autotuner chose for the projections on
  2026-11-30), the B/16 eval step at batch 64 hands the q bias, the MLP's biases and the
  residual adds to the products' epilogues: the one add kernel left per block on the stream
  is the spatial adapter's skip branch (its projection of the attention output, which XLA
  merges with D_fc1's product of the same input, + the bias + the stream), which its D_fc2
  product then takes as its addend, as T_Adapter's and the MLP's products take the stream
  (3 addends per block)."""
  out, hlo = tmp_path / 'aot.json', tmp_path / 'hlo'
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/k400.py:b16_f8', '--mode', 'eval',
            '--batch', '64', '--out', str(out), '--hlo_dir', str(hlo)],
           xla_flags='--xla_gpu_enable_triton_gemm=false')
  assert p.returncode == 0, p.stderr[-2000:]
  text = (hlo / 'default_eval.hlo').read_text()
  adds = [k for k in H.kernels(text) if k.family == 'elementwise' and 'add' in k.name]
  on = lambda *shapes: [(k.name, k.where) for k in adds if k.shape.startswith(shapes)]
  assert len(on('bf16[64,8,200,768]', 'bf16[102400,768]')) == 12, on('bf16[64,8,200,768]')
  assert on('bf16[64,8,200,12,64]', 'bf16[512,200,12,64]') == []      # q's bias
  assert text.count('"beta":1') == 3 * 12
  # Training, with drop path's draw per token on T_Adapter's and the joint adapter's biases:
  # the stream and that per-row bias are summed in one kernel, the product's addend, with no
  # kernel of its own broadcasting the bias and no second pass adding the stream: 34 adds on
  # the stream in the forward pass (an add kernel, or an add inside a norm's reduction),
  # where summing the bias on its own took 22 broadcast kernels and 12 more adds.
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/k400.py:b16_f8', '--mode', 'train',
            '--batch', '64', '--out', str(out), '--hlo_dir', str(hlo),
            '--config.compiler_options=xla_gpu_enable_triton_gemm=false'])
  assert p.returncode == 0, p.stderr[-2000:]
  shapes = ('bf16[64,8,200,768]', 'bf16[102400,768]')
  stream = [k for k in H.kernels((hlo / 'default_train.hlo').read_text())
            if k.family in ('elementwise', 'reduction') and k.where.endswith('fwd')
            and k.shape.lstrip('(').startswith(shapes)]
  assert [k.name for k in stream if 'broadcast' in k.name] == []
  assert sum(k.launches for k in stream if 'add' in k.name) == 34, [
      (k.name, k.where) for k in stream]


@pytest.mark.skipif(not _has_cuda_plugin(), reason='needs JAX\'s CUDA plugin (no GPU needed)')
def test_each_layer_norm_of_the_eval_step_is_one_triton_kernel(tmp_path):
  """With the variance as the mean square of x - mean (`norm._stats`), XLA's GPU compiler
  fuses a whole LayerNorm (both row means and the normalisation) into one Triton kernel:
  the B/16 eval step at batch 64 has no row-reduction kernel of its own for its norms and
  one launch per norm. (The fast form E[x^2] - E[x]^2 left a reduction kernel, a small
  kernel and a normalising one per norm.)"""
  out, hlo = tmp_path / 'aot.json', tmp_path / 'hlo'
  p = _run(['benchmarks.gpu_aot', '--config', 'configs/k400.py:b16_f8', '--mode', 'eval',
            '--batch', '64', '--out', str(out), '--hlo_dir', str(hlo)])
  assert p.returncode == 0, p.stderr[-2000:]
  text = (hlo / 'default_eval.hlo').read_text()
  norms = [k for k in H.kernels(text) if k.where.split('/')[0].split()[0] in ('ln_1', 'ln_2')]
  assert [k.name for k in norms if k.family == 'reduction'] == []
  triton = {line.split('=')[0].strip().lstrip('%').replace('.', '_')
            for line in text.splitlines() if '"kind":"__triton"' in line}
  assert {k.name for k in norms} <= triton, [(k.name, k.where) for k in norms]
  # ln_1 before the temporal and the spatial attention of each of the 12 blocks; ln_2 in
  # 11 of them (the last block's is fused with the add before it, a Triton kernel named
  # after the block).
  count = lambda name: sum(k.launches for k in norms if k.where.startswith(name))
  assert (count('ln_1'), count('ln_2')) == (24, 11), [(k.name, k.where) for k in norms]


def test_gpu_report_says_whether_the_temporal_kernel_rows_are_faster(tmp_path):
  """The temporal_pallas rows decide TEMPORAL_PALLAS_PLATFORMS: faster than the default row
  in train and eval is 'met'; slower in either, 'missed'; without both rows, not measured."""
  from benchmarks import gpu_report
  target = ("temporal_pallas rows faster than the default (then 'auto' may take them: "
            'TEMPORAL_PALLAS_PLATFORMS)')
  check = lambda: {c['target']: c for c in gpu_report.report(str(tmp_path))['checks']}[target]
  write = lambda mode, clips, tp: (tmp_path / f'b16_{mode}.json').write_text(json.dumps(
      dict(results=[_row(mode, clips)] + ([_row(mode, tp, 'temporal_pallas')] if tp else []))))
  write('train', 365.5, None)
  assert check()['status'] == 'not measured'
  write('train', 365.5, 400.0)
  write('eval', 857.2, 900.0)
  c = check()
  assert c['status'] == 'met' and c['note'] == 'train 160.0 vs 175.1 ms; eval 71.1 vs 74.7 ms'
  write('eval', 857.2, 800.0)
  assert check()['status'] == 'missed'
