"""The official PyTorch AIM, loaded from its own files with our weights, computes our function;
`python -m benchmarks.step_benchmark --official DIR` times it beside ours and reports the ratio.

Needs the official files in `.official/` (git-ignored, fetched by hand: CI has no copy) and torch.
timm (imported by the official vit_clip.py) needs torchvision, which has no CPU build here: a
stub package is served to these tests only (as in test_backbones.py).
"""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torchvision_stub
from conftest import ROOT, cpu_env

from aim_jax.models.factory import resolve_model_config
from configs import tiny

OFFICIAL = ROOT / '.official'
pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not (OFFICIAL / 'mmaction/models/backbones/vit_clip.py').is_file(),
                       reason='no copy of the official AIM files in .official/ (git-ignored; '
                              'fetch mmaction/models/{backbones,heads} of '
                              'taoyang1122/adapt-image-models there)'),
]


@pytest.fixture(scope='module')
def official_torch():
  pytest.importorskip('torch')
  pytest.importorskip('einops')
  if importlib.util.find_spec('timm') is None:   # importing it needs torchvision (served below)
    pytest.skip('timm is not installed')
  with torchvision_stub.installed():
    from benchmarks import official_torch as module
    yield module


@pytest.fixture(scope='module')
def modules(official_torch):
  return official_torch.load_official(OFFICIAL)


def _tiny_cfg(**adapters):
  c = tiny.get_config().to_dict()['model']
  c['adapters'].update(adapters)
  return resolve_model_config(c)


def _randomised_params(official_torch, cfg, seed):
  """Our init with every leaf moved off it (zero D_fc2 would hide the adapters)."""
  _, params = official_torch._init_params(cfg)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (p + 0.2 * rng.normal(size=p.shape)).astype(np.float32), params)


@pytest.mark.parametrize('num_tadapter,scale', [(1, 0.5), (2, 1.0)])
def test_official_model_with_our_params_gives_our_logits(official_torch, modules, num_tadapter,
                                                         scale):
  cfg = _tiny_cfg(num_tadapter=num_tadapter, scale=scale)
  params = _randomised_params(official_torch, cfg, seed=num_tadapter)
  torch_model = official_torch.build_official(cfg, params, modules)   # strict load
  from aim_jax.models.factory import build_model
  clips = np.random.default_rng(7).normal(size=(3, 4, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(build_model(cfg).apply({'params': params}, clips, train=False))
  theirs = official_torch.official_logits(torch_model, clips, 'float32',
                                          official_torch.torch.device('cpu'))
  assert np.abs(ours).max() > 0.1              # not a trivially small output
  np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=0)


def test_load_serves_shims_only_while_loading(official_torch, modules):
  assert 'mmaction.models.builder' in modules.stand_ins and 'mmcv.cnn' in modules.stand_ins
  assert not [n for n in sys.modules if n.split('.')[0] in ('mmaction', 'mmcv')]
  assert set(modules.files) == set(official_torch.FILES.values())


def test_official_trains_exactly_our_trainable_set(official_torch, modules):
  from aim_jax import params as P
  config = tiny.get_config()
  cfg = resolve_model_config(config.model)
  _, params = official_torch._init_params(cfg)
  model = official_torch.build_official(cfg, params, modules)
  keys = official_torch.trainable_keys(params, cfg, list(config.trainable))
  groups = official_torch.param_groups(model, keys, config.optimizer)
  tunable, _ = P.parameter_counts(params, list(config.trainable))
  assert sum(p.numel() for g in groups for p in g['params']) == tunable
  assert sum(p.numel() for p in model.parameters() if p.requires_grad) == tunable
  # mmcv paramwise rule: ln_post has no weight decay, the adapters and head do.
  wd = {n: g['weight_decay'] for g in groups for n, p in model.named_parameters()
        if any(p is q for q in g['params'])}
  assert wd['backbone.ln_post.weight'] == 0.0
  assert wd['backbone.transformer.resblocks.0.S_Adapter.D_fc1.bias'] == 0.05
  assert wd['cls_head.fc_cls.weight'] == 0.05


def test_official_refuses_a_config_it_cannot_express(official_torch, modules):
  cfg = _tiny_cfg(position='top', position_count=1)
  with pytest.raises(ValueError, match='adapters.position'):
    official_torch.build_official(cfg, {}, modules)


def test_ratio_is_ours_per_device_over_each_official_row_and_survives_an_official_failure(
    official_torch):
  ours = [dict(mode='train', batch=64, devices=2, dtype='bfloat16', clips_per_s=100.0, mfu=0.4,
               gmacs_per_clip=202.1, step_s_median=0.64, step_s_p10=0.6, step_s_p90=0.7,
               peak_memory_bytes=2**34),
          dict(mode='eval', batch=64, devices=2, dtype='bfloat16', clips_per_s=300.0, mfu=None,
               gmacs_per_clip=202.1, step_s_median=0.2, step_s_p10=0.2, step_s_p90=0.2,
               peak_memory_bytes=None)]
  timed = dict(batch=32, dtype='bfloat16', step_s_p10=0.1, step_s_p90=0.2, peak_memory_bytes=None)
  run = dict(info={'device': 'cuda'}, rows=[
      dict(timed, impl='official_torch', official_mode='eager', mode='train', clips_per_s=20.0,
           step_s_median=1.6),
      dict(impl='official_torch', official_mode='eager', mode='eval', batch=32,
           dtype='bfloat16', error='out of memory: CUDA'),
      dict(timed, impl='official_torch_compile', official_mode='compiled', mode='train',
           clips_per_s=40.0, step_s_median=0.8),
      dict(timed, impl='official_torch_compile', official_mode='compiled', mode='eval',
           clips_per_s=200.0, step_s_median=0.16)])
  compared = official_torch.compare(ours, run)
  assert compared['ratio'] == {'eager': {'train': pytest.approx(2.5), 'eval': None},  # (100/2)/20
                               'compiled': {'train': pytest.approx(1.25),
                                            'eval': pytest.approx(0.75)}}
  assert compared['official'][0]['mfu'] == pytest.approx(0.4 * 20 / 50)
  table = official_torch.format_side_by_side(ours, compared).splitlines()
  assert [line.split('|')[1].strip() for line in table[2:]] == [
      'aim_jax', 'official torch eager', 'official torch compiled',
      'aim_jax', 'official torch eager', 'official torch compiled']
  assert table[3].endswith('| 2.50x |') and table[4].endswith('| 1.25x |')
  assert 'out of memory' in table[6] and table[7].endswith('| 0.75x |')


@pytest.mark.slow   # Dynamo + AOTAutograd tracing of the official model (~50 s loaded)
def test_compiled_official_traces_with_dynamo_and_computes_the_eager_function(official_torch,
                                                                            modules):
  """torch.compile through Dynamo + AOTAutograd (backend aot_eager: the graphs inductor would
  get, without a C++ compiler) on the official files, inside `importable`: same logits as eager,
  and the fused-AdamW train step updates exactly the trainable set."""
  torch = official_torch.torch
  config = tiny.get_config()
  cfg = resolve_model_config(config.model)
  params = _randomised_params(official_torch, cfg, seed=3)
  clips = np.random.default_rng(5).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
  eager = official_torch.official_logits(official_torch.build_official(cfg, params, modules),
                                         clips, 'float32', torch.device('cpu'))
  model = official_torch.build_official(cfg, params, modules)
  keys = official_torch.trainable_keys(params, cfg, list(config.trainable))
  groups = official_torch.param_groups(model, keys, config.optimizer)
  before = {n: p.detach().clone() for n, p in model.named_parameters()}
  torch._dynamo.reset()
  with official_torch.importable(modules):
    assert 'mmaction.models.backbones.vit_clip' in sys.modules
    compiled = torch.compile(model, backend='aot_eager')
    with torch.no_grad():
      logits = compiled.eval()(torch.from_numpy(clips.transpose(0, 4, 1, 2, 3).copy()))
    np.testing.assert_allclose(logits.numpy(), eager, atol=1e-5, rtol=0)
    row = official_torch.time_official(
        model, mode='train', batch=2, model_cfg=cfg, groups=groups,
        optimizer_cfg=config.optimizer, steps_n=1, warmup=0, device=torch.device('cpu'),
        compiled=True, compile_backend='aot_eager')
  assert not [n for n in sys.modules if n.split('.')[0] in ('mmaction', 'mmcv')]
  assert row['impl'] == 'official_torch_compile' and row['official_mode'] == 'compiled'
  assert row['compile_s'] == row['first_step_s'] > 0 and row['fused_adamw'] is True
  assert row['compile_backend'] == 'aot_eager' and row['clips_per_s'] > 0
  changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
  assert changed == keys
  torch._dynamo.reset()


def test_official_modes_are_checked(official_torch):
  with pytest.raises(ValueError, match='--official_modes .*eager,compiled'):
    official_torch.run_official(tiny.get_config(), 2, ['train'], str(OFFICIAL), 1, 0,
                                official_modes=['jit'])


@pytest.mark.slow   # a subprocess: JAX + torch imports, compilations (~1-2 min idle, more loaded)
def _run_benchmark(argv, before_run=''):
  """`benchmarks.step_benchmark` with `argv`, in a CPU subprocess with the torchvision stub
  (`before_run`: code run after the import, e.g. to replace a function)."""
  code = (f'import sys; sys.path.insert(0, {str(ROOT / "tests")!r})\n'
          'import torchvision_stub; torchvision_stub.install()\n'
          'from benchmarks import step_benchmark\n'
          f'{before_run}'
          f'step_benchmark.run({argv!r})\n')
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        env=cpu_env(1, CUDA_VISIBLE_DEVICES=''), capture_output=True, text=True,
                        timeout=900, check=False)


def test_benchmark_official_flag_writes_every_row_and_ratio(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'side_by_side.json'
  argv = ['benchmark', '--config', str(ROOT / 'configs/tiny.py'), '--mode', 'both', '--batch',
          '2', '--steps', '2', '--warmup', '0', '--official', str(OFFICIAL), '--official_modes',
          'eager,compiled', '--official_compile_backend', 'aot_eager', '--out', str(out)]
  proc = _run_benchmark(argv)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'tensorflow' not in proc.stderr
  result = json.loads(out.read_text())
  ours, theirs = result['results'], result['official']
  assert [r['mode'] for r in ours] == ['train', 'eval']
  assert [(r['official_mode'], r['mode']) for r in theirs] == [
      ('eager', 'train'), ('eager', 'eval'), ('compiled', 'train'), ('compiled', 'eval')]
  by_mode = {r['mode']: r for r in ours}
  for b in theirs:
    a = by_mode[b['mode']]
    assert 'error' not in b, b
    assert b['impl'] == {'eager': 'official_torch', 'compiled': 'official_torch_compile'}[
        b['official_mode']]
    assert b['batch'] == a['batch'] == 2
    assert b['dtype'] == a['dtype'] and b['steps'] == 2 and b['clips_per_s'] > 0
    assert result['ratio'][b['official_mode']][a['mode']] == pytest.approx(
        a['clips_per_s'] / b['clips_per_s'])
  assert theirs[0]['trainable_params'] > 0 and theirs[2]['compile_s'] > 0
  assert result['complete'] is True and 'official_rows_so_far' not in result
  info = result['official_info']
  assert info['device'] == 'cpu' and info['logits_max_abs_diff'] < 1e-5
  assert info['official_modes'] == ['eager', 'compiled']
  assert '| official torch eager | train | 2 |' in proc.stdout
  assert '| official torch compiled | eval | 2 |' in proc.stdout


def test_benchmark_times_ours_first_with_noofficial_first_and_rates_every_variant(tmp_path):
  """gpu.sh runs ours first (a time limit in a slow torch.compile keeps our rows); each
  --variant row gets its ratio to each official row."""
  pytest.importorskip('torch')
  out = tmp_path / 'side_by_side.json'
  argv = ['benchmark', '--config', str(ROOT / 'configs/tiny.py'), '--mode', 'eval', '--batch',
          '2', '--steps', '2', '--warmup', '0', '--official', str(OFFICIAL), '--official_modes',
          'eager', '--noofficial_first', '--variant',
          'elementwise:model.temporal_attention=elementwise', '--out', str(out)]
  proc = _run_benchmark(argv)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.index('"variant": "elementwise"') < proc.stdout.index('"official_row"')
  result = json.loads(out.read_text())
  (default, variant), (theirs,) = result['results'], result['official']
  for r in (default, variant):
    assert result['variant_ratio'][r['variant']]['eager']['eval'] == pytest.approx(
        r['clips_per_s'] / theirs['clips_per_s'])
  assert result['ratio']['eager']['eval'] == result['variant_ratio']['default']['eager']['eval']
  assert '| aim_jax [elementwise] | eval | 2 |' in proc.stdout


def test_rows_named_after_official_run_after_the_side_by_side_is_written(tmp_path):
  """gpu.sh names the Pallas rows in --after_official: if one hangs or poisons the process,
  the official rows and the ratios are already in --out. Here the late row kills the process."""
  pytest.importorskip('torch')
  out = tmp_path / 'side_by_side.json'
  argv = ['benchmark', '--config', str(ROOT / 'configs/tiny.py'), '--mode', 'eval', '--batch',
          '2', '--steps', '2', '--warmup', '0', '--official', str(OFFICIAL), '--official_modes',
          'eager', '--noofficial_first', '--after_official', 'late,absent', '--variant',
          'late:model.temporal_attention=elementwise', '--variant', 'xla:model.attention_impl=xla',
          '--out', str(out)]
  dies = ('import os\n'
          'timed = step_benchmark.time_steps\n'
          'def time_steps(cfg, *a, **k):\n'
          '  if cfg.model.temporal_attention == "elementwise":\n'
          '    print("LATE ROW STARTS", flush=True); os._exit(7)\n'
          '  return timed(cfg, *a, **k)\n'
          'step_benchmark.time_steps = time_steps\n')
  proc = _run_benchmark(argv, before_run=dies)
  assert proc.returncode == 7, proc.stderr[-3000:]
  assert '--after_official: no --variant named absent; ignored' in proc.stdout
  i_xla, i_official, i_late = (proc.stdout.index(s) for s in (
      '"variant": "xla"', '"official_row"', 'LATE ROW STARTS'))
  assert i_xla < i_official < i_late
  result = json.loads(out.read_text())
  assert result['complete'] is False
  assert [r['variant'] for r in result['results']] == ['default', 'xla']
  (theirs,) = result['official']
  for r in result['results']:
    assert result['variant_ratio'][r['variant']]['eager']['eval'] == pytest.approx(
        r['clips_per_s'] / theirs['clips_per_s'])
  assert result['ratio']['eager']['eval'] > 0


def test_a_failed_default_row_still_gets_the_official_rows(tmp_path):
  """If our default row fails on the device, the official rows still run and are written,
  their ratio to it null; the exit status is 1."""
  pytest.importorskip('torch')
  out = tmp_path / 'side_by_side.json'
  argv = ['benchmark', '--config', str(ROOT / 'configs/tiny.py'), '--mode', 'eval', '--batch',
          '2', '--steps', '2', '--warmup', '0', '--official', str(OFFICIAL), '--official_modes',
          'eager', '--noofficial_first', '--out', str(out)]
  fails = ('def time_steps(cfg, *a, **k):\n'
           '  raise RuntimeError("no execution plan")\n'
           'step_benchmark.time_steps = time_steps\n')
  proc = _run_benchmark(argv, before_run=fails)
  assert proc.returncode == 1, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['complete'] is True
  (ours,), (theirs,) = result['results'], result['official']
  assert ours['error'] == 'RuntimeError: no execution plan'
  assert theirs['clips_per_s'] > 0 and result['ratio'] == {'eager': {'eval': None}}
  assert '| official torch eager | eval | 2 |' in proc.stdout
