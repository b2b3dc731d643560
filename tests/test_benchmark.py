"""The benchmark times real jitted steps and reports consistent figures."""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, cpu_env

from benchmarks import attention_smoke, gpu_report, profile_kernels, step_benchmark
from configs import tiny


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_time_steps_reports_consistent_figures(mode):
  config = tiny.get_config()
  r = step_benchmark.time_steps(config, batch=8, mode=mode, steps_n=3, warmup=1)
  assert r['steps'] == 3 and r['batch'] == 8 and r['devices'] >= 1
  assert r['step_s_p10'] <= r['step_s_median'] <= r['step_s_p90']
  assert r['clips_per_s'] == pytest.approx(8 / r['step_s_median'])
  assert r['compile_s'] > 0 and r['gmacs_per_clip'] > 0
  assert r['mfu'] is None  # no bf16 peak is claimed for a CPU
  # The row says which attention program 'auto' chose (on a CPU: XLA).
  assert r['attention'] == dict(attention_impl='xla', qkv_projection='fused',
                                temporal_attention='einsum')
  assert step_benchmark.format_row(r).count('|') == 12


def test_peak_table_knows_the_accelerators_we_report():
  class Dev:
    device_kind = 'NVIDIA H100 80GB HBM3'
  assert step_benchmark.device_peak(Dev()) == 989e12


def test_profile_traces_a_real_cpu_step_and_sums_kernels_by_family(tmp_path):
  config = tiny.get_config()
  r = step_benchmark.time_steps(config, batch=8, mode='eval', steps_n=1, warmup=0,
                                profile_dir=str(tmp_path), profile_steps=2)
  p = r['profile']
  assert p['source'] == 'cpu' and p['steps'] == 2 and p['events'] > 0
  assert p['trace_file'].startswith(str(tmp_path / 'eval')) and p['trace_file'].endswith('.gz')
  fams = p['families']
  assert set(fams) == set(profile_kernels.FAMILY_NAMES)
  assert sum(f['share'] for f in fams.values()) == pytest.approx(1.0)
  assert sum(f['ms_per_step'] for f in fams.values()) == pytest.approx(p['kernel_ms_per_step'])
  assert fams['gemm']['ms_per_step'] > 0          # the projections: XLA:CPU dot / ynn_fusion ops
  # Only XLA ops are counted, never the runtime's own events (ThunkExecutor::Execute, ...).
  names = [k['name'] for k in p['top_kernels']]
  assert names and all(re.fullmatch(r'[a-z][a-z0-9_\-.]*', n) for n in names), names
  full = json.loads((tmp_path / 'eval' / 'kernels.json').read_text())
  assert sum(full['kernels_ms_per_step'].values()) == pytest.approx(p['kernel_ms_per_step'])
  table = profile_kernels.format_summary('eval', p)
  assert '| gemm |' in table and table.count('\n') == len(profile_kernels.FAMILY_NAMES) + 2


# Kernel names as an XLA GPU trace of our B/16 train step names them (jax 0.11, H200).
GPU_KERNELS = {
    'nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT': 'gemm',
    'gemm_fusion_dot_868': 'gemm',
    'void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5'
    '_nhwc_align8>(cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5_nhwc_align8::'
    'Params)': 'gemm',
    'input_transpose_fusion_50': 'transpose/copy',
    'loop_transpose_fusion_23': 'transpose/copy',
    'wrapped_transpose_12': 'transpose/copy',
    'void nhwcAddPaddingKernel<__nv_bfloat16, __nv_bfloat16, float, true, '
    '(cudnnKernelDataType_t)0>(int, int)': 'transpose/copy',
    'Memset ': 'transpose/copy',
    'input_reduce_fusion_66': 'reduction',
    'input_add_reduce_fusion_120': 'reduction',
    'loop_multiply_fusion_11': 'elementwise',
    'loop_convert_fusion': 'elementwise',
    'fusion_2937': 'elementwise',
    'wrapped_slice_1': 'elementwise',
    'cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128': 'attention',
    'some_custom_kernel': 'other',
}


def test_a_profiler_that_fails_costs_the_row_its_profile_not_its_figures(tmp_path, monkeypatch):
  def no_trace(trace_dir, steps, wall_s=None):
    raise FileNotFoundError(f'{trace_dir}: no *.trace.json.gz / perfetto_trace.json.gz under it')
  monkeypatch.setattr(profile_kernels, 'summarize_trace', no_trace)
  r = step_benchmark.time_steps(tiny.get_config(), batch=8, mode='eval', steps_n=1, warmup=0,
                                profile_dir=str(tmp_path), profile_steps=1)
  assert r['clips_per_s'] > 0 and r['compile_s'] > 0
  assert r['profile'] == {'error': f'FileNotFoundError: {tmp_path}/eval: no *.trace.json.gz '
                                   '/ perfetto_trace.json.gz under it'}
  run = dict(results=[dict(r, variant='default')])
  share = [c for c in gpu_report._mode_checks(run, 'eval') if 'transposes' in c['target']]
  assert share == []      # eval has no transpose check; train's reads no families, below
  train = dict(results=[dict(r, mode='train', variant='default')])
  (share,) = [c for c in gpu_report._mode_checks(train, 'train') if 'transposes' in c['target']]
  assert share['status'] == 'not measured'


def test_profile_families_of_gpu_kernel_names():
  for name, fam in GPU_KERNELS.items():
    assert profile_kernels.family(name) == fam, name


def test_profile_counts_gpu_stream_kernels_only():
  meta = [
      dict(ph='M', name='process_name', pid=1, args=dict(name='/device:GPU:0')),
      dict(ph='M', name='thread_name', pid=1, tid=10, args=dict(name='Stream #13(Compute)')),
      dict(ph='M', name='thread_name', pid=1, tid=11, args=dict(name='XLA Ops')),
      dict(ph='M', name='process_name', pid=2, args=dict(name='/host:CPU')),
      dict(ph='M', name='thread_name', pid=2, tid=20, args=dict(name='python')),
  ]
  kernels = [('nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT', 300.0),
             ('gemm_fusion_dot_868', 100.0), ('input_transpose_fusion_50', 200.0),
             ('input_reduce_fusion_66', 100.0), ('loop_add_fusion_48', 150.0),
             ('nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT', 150.0)]
  events = meta + [dict(ph='X', pid=1, tid=10, ts=i, dur=d, name=n)
                   for i, (n, d) in enumerate(kernels)]
  events += [dict(ph='X', pid=1, tid=11, ts=0, dur=5000.0, name='fusion.1'),      # op line
             dict(ph='X', pid=2, tid=20, ts=0, dur=9000.0, name='PjitFunction(step)'),
             dict(ph='i', pid=1, tid=10, ts=0, name='marker')]
  s = profile_kernels.summarize_events(events, steps=2, wall_s=0.001)
  assert s['source'] == 'device' and s['events'] == 6 and s['distinct_kernels'] == 5
  assert s['kernel_ms_per_step'] == pytest.approx(1000.0 / 1e3 / 2)
  assert s['wall_ms_per_step'] == pytest.approx(0.5)
  fams = s['families']
  assert fams['gemm']['ms_per_step'] == pytest.approx(0.275)     # (300 + 150 + 100) us / 2
  assert fams['gemm']['share'] == pytest.approx(0.55)
  assert fams['transpose/copy']['share'] == pytest.approx(0.2)
  assert fams['reduction']['share'] == pytest.approx(0.1)
  assert fams['elementwise']['share'] == pytest.approx(0.15)
  assert fams['attention']['ms_per_step'] == 0.0
  assert s['top_kernels'][0] == dict(name='nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT',
                                     family='gemm', ms_per_step=pytest.approx(0.225))


def test_profile_reports_a_missing_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match='no \\*.trace.json.gz'):
    profile_kernels.summarize_trace(tmp_path, steps=1)


@pytest.mark.parametrize('impl,padded,odd_ok', [('xla', 6, True), ('pallas', 32, False)])
def test_attention_smoke_pads_and_matches_xla(tmp_path, impl, padded, odd_ok):
  """The padded case, forward and backward, against XLA on the valid rows: padded to an even
  length for XLA and cuDNN; for 'pallas' the real kernel (Pallas's interpreter here) as the
  model runs it, padded to its 32-token tiles and masked by segment, whose tiling refuses the
  odd length (a result, not an error). XLA accepts 5 under grad; cuDNN is what may not."""
  out = tmp_path / 'att.json'
  assert attention_smoke.main(['--implementation', impl, '--batch', '2', '--heads', '2',
                               '--tokens', '5', '--head_dim', '16', '--dtype', 'float32',
                               '--out', str(out)]) == 0
  r = json.loads(out.read_text())
  assert r['tokens'] == 5 and r['padded_tokens'] == padded
  assert r['padded']['ok'] and r['padded']['max_abs_diff_vs_xla']['dk_padding'] == 0.0
  assert max(r['padded']['max_abs_diff_vs_xla'].values()) < 1e-5
  assert r['odd_length_grad']['ok'] == odd_ok
  if not odd_ok:
    assert 'multiple of 16' in r['odd_length_grad']['error']
  assert r['auto_check'] == {'ok': True, 'why': '', 'choice': impl}


def test_attention_smoke_says_what_auto_chooses_when_cudnn_fails(monkeypatch):
  """cuDNN failing its check (no cuDNN on this CPU: its real failure) runs the Pallas check,
  and 'auto' would choose the Pallas kernel; both failing, XLA."""
  from aim_jax.models import attention_choice
  real = attention_choice._compare_with_xla
  r = attention_smoke.run('cudnn', batch=2, tokens=5, heads=2, head_dim=16, dtype='bfloat16')
  assert r['padded_tokens'] == 8                      # the model's multiple for cuDNN
  assert not r['padded']['ok'] and not r['auto_check']['ok']
  assert r['auto_check']['pallas'] == {'ok': True, 'why': ''}
  assert r['auto_check']['choice'] == 'pallas'
  monkeypatch.setattr(attention_choice, '_compare_with_xla',
                      lambda impl: (False, 'no') if impl == 'pallas' else real(impl))
  r = attention_smoke.run('cudnn', batch=2, tokens=5, heads=2, head_dim=16, dtype='bfloat16')
  assert r['auto_check']['pallas'] == {'ok': False, 'why': 'no'}
  assert r['auto_check']['choice'] == 'xla'


@pytest.mark.slow   # a subprocess: imports and one tiny compilation (~30 s idle)
def test_step_benchmark_cli_never_imports_tensorflow_on_synthetic_data(tmp_path):
  out = tmp_path / 'b.json'
  code = ('import atexit, sys\n'
          'atexit.register(lambda: print("TENSORFLOW_LOADED", "tensorflow" in sys.modules))\n'
          'from benchmarks import step_benchmark\n'
          f'step_benchmark.run(["b", "--config", "configs/tiny.py", "--mode", "eval", "--batch",'
          f' "2", "--steps", "1", "--warmup", "0", "--out", {str(out)!r}])\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env=cpu_env(1), timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'TENSORFLOW_LOADED False' in proc.stdout
  result = json.loads(out.read_text())
  assert result['complete'] is True and [r['mode'] for r in result['results']] == ['eval']


def test_gpu_script_refuses_an_unknown_option(tmp_path):
  proc = subprocess.run(['bash', str(ROOT / 'benchmarks/gpu.sh'), str(tmp_path), '--gpu'],
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and 'unknown option --gpu' in proc.stderr
  out = tmp_path / 'parts'
  proc = subprocess.run(['bash', str(ROOT / 'benchmarks/gpu.sh'), str(out)],
                        env=dict(cpu_env(1), GPU_SH_PARTS='b16_train,b16_tain'),
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and not out.exists()
  assert proc.stderr.startswith('gpu.sh: GPU_SH_PARTS: no part named b16_tain (the parts: ')
  assert len(proc.stderr.splitlines()) == 1


def test_gpu_script_runs_only_the_parts_named(tmp_path):
  """GPU_SH_PARTS (a second, short call on a warm GPU machine): the parts not named are
  skipped and say so; the rest, the report included, runs as usual."""
  proc = subprocess.run(['bash', str(ROOT / 'benchmarks/gpu.sh'), str(tmp_path), '--cpu-smoke'],
                        env=dict(cpu_env(1), GPU_SH_PARTS='cudnn_attention,norm_kernels',
                                 PYTHON=sys.executable, GPU_SH_CACHE=str(tmp_path / 'cache')),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = (tmp_path / 'summary.txt').read_text()
  assert re.search(r'^cudnn_attention: rc=0 ', summary, re.M)
  assert re.search(r'^norm_kernels: rc=0 ', summary, re.M)
  for name in ('b16_train', 'b16_eval', 'l14_train', 'l14_unrolled', 'mlp_kernels'):
    assert f'{name}: skipped (GPU_SH_PARTS)' in summary
  assert json.loads((tmp_path / 'cudnn_attention.json').read_text())['padded']['ok']
  assert not (tmp_path / 'b16_train.json').exists()
  # env.txt names the tree measured by its content (the git metadata a device's copy carries
  # may be older), as `git ls-files -z | xargs -0 sha1sum | sha1sum` gives it here.
  tree = subprocess.run('git ls-files -z | xargs -0 sha1sum | sha1sum | cut -c1-12', shell=True,
                        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
  assert f'tree {tree}\n' in (tmp_path / 'env.txt').read_text()
  report = json.loads((tmp_path / 'report.json').read_text())
  assert {c['status'] for c in report['checks'] if c['target'].startswith('train:')} == {
      'not measured'}


def test_gpu_script_variants_replace_the_extra_rows(tmp_path):
  """GPU_SH_VARIANTS ('NAME:FIELDS;...') are the B/16 parts' extra rows instead of the
  script's own (empty: the default row alone, as in the second H200 call of 2026-12-04)."""
  proc = subprocess.run(['bash', str(ROOT / 'benchmarks/gpu.sh'), str(tmp_path), '--cpu-smoke'],
                        env=dict(cpu_env(1), GPU_SH_PARTS='b16_eval', PYTHON=sys.executable,
                                 GPU_SH_VARIANTS='tdpa:model.temporal_attention=dot_product_attention;',
                                 GPU_SH_CACHE=str(tmp_path / 'cache')),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'b16_eval.json').read_text())['results']
  assert [(r['variant'], r['attention']['temporal_attention']) for r in rows] == [
      ('default', 'einsum'), ('tdpa', 'dot_product_attention')]


def test_profile_without_stream_lines_counts_the_xla_ops_line():
  events = [dict(ph='M', name='process_name', pid=1, args=dict(name='/device:TPU:0')),
            dict(ph='M', name='thread_name', pid=1, tid=1, args=dict(name='XLA Modules')),
            dict(ph='M', name='thread_name', pid=1, tid=2, args=dict(name='XLA Ops')),
            dict(ph='X', pid=1, tid=1, ts=0, dur=100.0, name='jit_step(123)'),
            dict(ph='X', pid=1, tid=2, ts=0, dur=60.0, name='fusion.3'),
            dict(ph='X', pid=1, tid=2, ts=60, dur=40.0, name='convolution.1')]
  s = profile_kernels.summarize_events(events, steps=1)
  assert s['events'] == 2 and s['kernel_ms_per_step'] == pytest.approx(0.1)
  assert s['families']['gemm']['ms_per_step'] == pytest.approx(0.04)


def test_rows_named_after_official_are_timed_after_all_the_others():
  variants = [('default', None, ''), ('xla', None, 'x'), ('pallas_kernels', None, 'k'),
              ('pallas', None, 'p')]
  order = step_benchmark.order_rows(['train', 'eval'], variants, {'pallas_kernels', 'pallas'})
  assert [(mode, v[0]) for mode, v in order] == [
      ('train', 'default'), ('train', 'xla'), ('eval', 'default'), ('eval', 'xla'),
      ('train', 'pallas_kernels'), ('train', 'pallas'), ('eval', 'pallas_kernels'),
      ('eval', 'pallas')]
  assert step_benchmark.order_rows(['eval'], variants, set()) == [('eval', v) for v in variants]


def test_step_benchmark_refuses_the_default_row_after_the_official_ones(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.step_benchmark', '--config',
                         'configs/tiny.py', '--after_official', 'default,xla', '--variant',
                         'xla:model.attention_impl=xla', '--out', str(tmp_path / 'x.json')],
                        cwd=ROOT, capture_output=True, text=True, env=cpu_env(1), timeout=300,
                        check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "step_benchmark: --after_official: the 'default' row is ours to compare; name "
      '--variant rows only']
  assert not (tmp_path / 'x.json').exists()


def test_a_failed_default_row_keeps_its_error_and_the_other_rows_still_run(tmp_path):
  """A default row that fails on the device (cuDNN without a plan for the model's shapes) must
  not cost the other rows of the part (in gpu.sh, the official ones too): its error is kept,
  the rest run, and the exit status says it failed."""
  out = tmp_path / 'rows.json'
  code = ('from benchmarks import step_benchmark\n'
          'timed = step_benchmark.time_steps\n'
          'def time_steps(cfg, *a, **k):\n'
          '  if cfg.model.temporal_attention != "elementwise":\n'
          '    raise RuntimeError("no execution plan\\nsecond line")\n'
          '  return timed(cfg, *a, **k)\n'
          'step_benchmark.time_steps = time_steps\n'
          'step_benchmark.run(["b", "--config", "configs/tiny.py", "--mode", "eval", "--batch",'
          ' "2", "--steps", "1", "--warmup", "0", "--variant",'
          f' "elementwise:model.temporal_attention=elementwise", "--out", {str(out)!r}])\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env=cpu_env(1), timeout=600, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'step_benchmark: our default row failed: eval: RuntimeError: no execution plan')
  assert 'Traceback' in proc.stderr      # the whole error is in the log
  result = json.loads(out.read_text())
  default, variant = result['results']
  assert result['complete'] is True
  assert default['error'] == 'RuntimeError: no execution plan\nsecond line'
  assert variant['variant'] == 'elementwise' and variant['clips_per_s'] > 0


@pytest.mark.slow
def test_compile_time_compiles_then_loads_from_the_cache(tmp_path):
  out = tmp_path / 'compile.json'
  env = cpu_env(1)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)          # it makes a fresh one of its own
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.compile_time', '--config',
                         'configs/tiny.py', '--mode', 'train', '--batch', '2', '--out', str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  first, second = json.loads(out.read_text())['rows']
  assert (first['run'], first['loaded'], first['stored']) == ('first', 0, 1), first
  assert (second['run'], second['loaded'], second['stored']) == ('second', 1, 0), second
  assert '| first | train | 2 |' in proc.stdout and '| second | train | 2 |' in proc.stdout
  # A cache that already holds the program (gpu.sh's): both runs load it; the cache is kept.
  cache = tmp_path / 'cache'
  for _ in range(2):
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.compile_time', '--config',
                           'configs/tiny.py', '--batch', '2', '--cache_dir', str(cache),
                           '--out', str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert [r['loaded'] for r in json.loads(out.read_text())['rows']] == [1, 1]
  assert any(cache.iterdir())


TINY = ['--config', 'configs/tiny.py']


@pytest.mark.parametrize('args,named', [
    (['--config', 'configs/nope.py'], '--config configs/nope.py: config file configs/nope.py '
                                      'does not exist'),
    ([], 'flag --config=None: '),
    (TINY + ['--config.modl.width=3'], '--config.modl.width=3: the config (configs/tiny.py) has '
                                       'no field modl'),
    (TINY + ['--batch', '-4'], 'flag --batch=-4: '),
    (TINY + ['--steps', '0'], 'flag --steps=0: '),
    (TINY + ['--remat', 'bogus'], "FlagError: --remat bogus: model.remat_policy must be 'none'"),
    (TINY + ['--config.model.width=0'], 'ConfigError: model.width=0 must be a positive integer'),
    (TINY + ['--out', '{tmp}/file/sub/b.json'],
     'FlagError: --out {tmp}/file/sub/b.json: cannot write in its folder {tmp}/file/sub: '
     'NotADirectoryError'),
    (TINY + ['extra'], "ConfigError: unexpected arguments ['extra']: every option is a --flag"),
], ids=['missing_file', 'no_config', 'unknown_field', 'batch', 'steps', 'remat', 'width', 'out',
        'stray_argument'])
def test_step_benchmark_refuses_bad_flags_and_configs_in_one_line(tmp_path, args, named):
  """A bad config file, field, flag or --out ends the command before anything is built or
  timed: exit status 2 and one line naming it, no traceback (as `aim_jax.train`)."""
  (tmp_path / 'file').write_text('a regular file, not a folder')
  argv = ['--mode', 'eval', '--batch', '2', '--steps', '1', '--warmup', '0'] + [
      a.replace('{tmp}', str(tmp_path)) for a in args]      # the flags given last win
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.step_benchmark'] + argv, cwd=ROOT,
                        capture_output=True, text=True, env=cpu_env(1), timeout=300,
                        check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert lines[0].startswith('step_benchmark: ' + named.replace('{tmp}', str(tmp_path))), lines
  assert 'compiled' not in proc.stdout         # refused before anything was built
