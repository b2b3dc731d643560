"""Official AIM checkpoints: the golden state dicts, written as mmaction2 `.pth` files and converted
by the command, reproduce the official logits and multi-view scores; export back is exact."""

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, cli_error_line

from aim_jax.convert import cli as convert_cli
from aim_jax import convert
from aim_jax import checkpoints
from aim_jax import params as P
from aim_jax.models.aim import average_views
from aim_jax.models.factory import build_model
from aim_jax.convert.official_names import ConversionError

CASES = ['aim_tiny_case1', 'aim_tiny_case1_tadapter2']
torch = pytest.importorskip('torch')
pytestmark = pytest.mark.torch


def golden(name):
  d = np.load(GOLDEN / f'{name}.npz')
  meta = json.loads(str(d['config_json'][0]))
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  return d, meta, sd


def write_mmaction_pth(sd, path):
  """As mmcv's save_checkpoint writes it: meta, state_dict, optimizer (numpy in meta)."""
  torch.save({'meta': {'mmcv_version': '1.4.0', 'epoch': 30, 'iter': 1000,
                       'hook_msgs': {'best_score': np.float64(0.81)}},
              'state_dict': {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
              'optimizer': {'state': {}, 'param_groups': [{'lr': 3e-4, 'params': [0, 1]}]}},
             path)


def ncthw_to_nthwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 4, 1)       # (B, C, T, H, W) -> (B, T, H, W, C)


@pytest.mark.parametrize('case', CASES)
def test_converted_official_checkpoint_reproduces_golden_logits_and_scores(tmp_path, case):
  d, meta, sd = golden(case)
  write_mmaction_pth(sd, tmp_path / 'model.pth')
  args = ['aim', '--src', str(tmp_path / 'model.pth'), '--out', str(tmp_path / 'out'),
          '--heads', str(meta['heads'])]
  if meta['num_tadapter'] == 1:
    args += ['--adapter-scale', str(meta['adapter_scale'])]   # else: the SSv2 default 1.0
  assert convert_cli.main(args) == 0
  params, cfg, info = checkpoints.load_params(str(tmp_path / 'out'))
  assert (cfg['num_frames'], cfg['num_classes'], cfg['adapters']['num_tadapter'],
          cfg['adapters']['scale'], cfg['image_size']) == (
              meta['num_frames'], meta['num_classes'], meta['num_tadapter'],
              meta['adapter_scale'], meta['input_resolution'])
  assert info['kind'] == 'aim' and info['mapped'] == len(sd) and not info['unused']
  model = build_model(cfg)
  logits = model.apply({'params': params}, ncthw_to_nthwc(d['input']))
  np.testing.assert_allclose(logits, d['logits'], atol=2e-5, rtol=0)
  mv = d['multiview_input']                                     # (1, V, C, T, H, W)
  v = mv.shape[1]
  views = model.apply({'params': params}, ncthw_to_nthwc(mv.reshape((-1,) + mv.shape[2:])))
  np.testing.assert_allclose(average_views(views, v, 'prob'), d['multiview_scores'],
                             atol=2e-5, rtol=0)


@pytest.mark.parametrize('case', CASES)
def test_export_aim_round_trip_is_exact(tmp_path, case):
  _, meta, sd = golden(case)
  write_mmaction_pth(sd, tmp_path / 'model.pth')
  conv = convert.convert(str(tmp_path / 'model.pth'), str(tmp_path / 'out'), 'aim',
                         heads=meta['heads'])
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'out'), '--out',
                       str(tmp_path / 'back.pth')]) == 0
  back = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)
  assert set(back) >= {'state_dict', 'meta'}
  assert set(back['state_dict']) == set(sd)
  for k, v in sd.items():
    got = back['state_dict'][k].numpy()
    assert got.shape == v.shape and got.dtype == v.dtype, k
    np.testing.assert_array_equal(got, v, err_msg=k)        # bit-exact
  again = convert.load_aim(str(tmp_path / 'back.pth'), heads=meta['heads'])
  for name, value in P.flatten(conv.params).items():
    np.testing.assert_array_equal(P.flatten(again.params)[name], value, err_msg=name)


def test_num_frames_change_interpolates_the_temporal_embedding(tmp_path, capsys):
  _, _, sd = golden('aim_tiny_case1')
  write_mmaction_pth(sd, tmp_path / 'model.pth')
  assert convert_cli.main(['aim', '--src', str(tmp_path / 'model.pth'), '--out',
                       str(tmp_path / 'out'), '--heads', '4', '--num-frames', '8']) == 0
  assert 'NOTICE: temporal embedding interpolated (linear) from 4 to 8' in capsys.readouterr().out
  params, cfg, _ = checkpoints.load_params(str(tmp_path / 'out'))
  assert cfg['num_frames'] == 8
  temb = params['backbone']['temporal_embedding']
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(sd['backbone.temporal_embedding']).permute(0, 2, 1), size=8,
      mode='linear', align_corners=False).permute(0, 2, 1).numpy()
  np.testing.assert_allclose(temb, ref, atol=1e-6)
  logits = build_model(cfg).apply({'params': params}, jnp.zeros((1, 8, 32, 32, 3)))
  assert logits.shape == (1, 5)
  # Both at once, for a larger input: the backbone's positional grid 4x4 -> 6x6.
  conv = convert.load_aim(str(tmp_path / 'model.pth'), heads=4, num_frames=8, image_size=48)
  assert conv.params['backbone']['positional_embedding'].shape == (1 + 6 * 6, 64)
  logits = build_model(conv.model_config).apply({'params': conv.params},
                                                jnp.zeros((1, 8, 48, 48, 3)))
  assert logits.shape == (1, 5)


def test_aim_errors_name_the_key(tmp_path):
  _, _, sd = golden('aim_tiny_case1')
  no_head = {k: v for k, v in sd.items() if not k.startswith('cls_head')}
  write_mmaction_pth(no_head, tmp_path / 'no_head.pth')
  with pytest.raises(ConversionError, match='no registered aim format'):
    convert.load_aim(str(tmp_path / 'no_head.pth'))
  wrong = dict(sd)
  wrong['backbone.transformer.resblocks.1.S_Adapter.D_fc1.weight'] = np.zeros((8, 64), np.float32)
  write_mmaction_pth(wrong, tmp_path / 'wrong.pth')
  with pytest.raises(ConversionError,
                     match=r"backbone\.transformer\.resblocks\.1\.S_Adapter\.D_fc1\.weight.*shape"):
    convert.load_aim(str(tmp_path / 'wrong.pth'), heads=4)
  # The `clip` command does not take an AIM recognizer for a CLIP tower.
  write_mmaction_pth(sd, tmp_path / 'model.pth')
  with pytest.raises(ConversionError, match='no registered image format'):
    convert.load_clip(str(tmp_path / 'model.pth'))


def test_clip_gelu_aim_model_round_trips_through_export_aim(tmp_path):
  """An AIM model on an OpenCLIP GELU backbone: the tensors are the official names, the family
  travels in the exported file's meta, so `convert aim` gives back 'clip_gelu' (and --act wins)."""
  import flax.linen as nn
  import jax

  from aim_jax.models.factory import input_shape, resolve_model_config
  cfg = resolve_model_config(dict(backbone='clip_gelu', width=64, layers=1, heads=1,
                                  patch_size=8, image_size=32, num_frames=2, num_classes=5))
  model = build_model(cfg)
  x = np.random.default_rng(0).normal(size=input_shape(cfg, 1)).astype(np.float32)
  params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(1), x))['params'])
  checkpoints.save_params(str(tmp_path / 'src'), params, cfg)
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out',
                       str(tmp_path / 'm.pth')]) == 0
  conv = convert.load_aim(str(tmp_path / 'm.pth'), adapter_scale=0.5)
  assert conv.model_config['backbone'] == 'clip_gelu'
  assert any("meta.model_config (backbone 'clip_gelu')" in n for n in conv.report.notices)
  for name, value in P.flatten(params).items():
    np.testing.assert_array_equal(P.flatten(conv.params)[name], value, err_msg=name)
  want = model.apply({'params': params}, x)
  got = build_model(conv.model_config).apply({'params': conv.params}, x)
  np.testing.assert_array_equal(got, want)
  assert convert.load_aim(str(tmp_path / 'm.pth'), act='quick_gelu').model_config[
      'backbone'] == 'clip'
  # An official file (no such meta) is the QuickGELU CLIP of the model zoo unless told.
  _, _, sd = golden('aim_tiny_case1')
  write_mmaction_pth(sd, tmp_path / 'zoo.pth')
  assert convert.load_aim(str(tmp_path / 'zoo.pth'), heads=4).model_config['backbone'] == 'clip'
  assert convert.load_aim(str(tmp_path / 'zoo.pth'), heads=4,
                          act='gelu').model_config['backbone'] == 'clip_gelu'


def _random_aim(tmp_path, seed=0, **fields):
  """A small AIM model with random (non-zero) weights, saved as a parameter checkpoint."""
  import jax

  from aim_jax.models.factory import input_shape, resolve_model_config
  cfg = resolve_model_config(dict(backbone='clip', layers=2, patch_size=8, image_size=32,
                                  num_frames=2, num_classes=5, **fields))
  model = build_model(cfg)
  x = np.random.default_rng(seed).normal(size=input_shape(cfg, 1)).astype(np.float32)
  import flax.linen as nn
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x))['params'])
  rng = np.random.default_rng(seed + 1)
  params = P.unflatten({k: (0.1 * rng.normal(size=v.shape)).astype(np.float32)
                        for k, v in P.flatten(shapes).items()})
  checkpoints.save_params(str(tmp_path / 'src'), params, cfg)
  return cfg, params, x


@pytest.mark.parametrize('width,heads,scale', [(64, 4, 0.8), (32, 2, 1.0)])
def test_export_aim_then_convert_aim_gives_the_same_logits_exactly(tmp_path, width, heads,
                                                                   scale):
  """Heads (not width/64) and the adapter scale travel in the exported file's meta."""
  cfg, params, x = _random_aim(tmp_path, width=width, heads=heads,
                               adapters=dict(scale=scale), dropout_rate=0.0, drop_path_rate=0.1)
  assert (cfg['heads'], cfg['adapters']['scale']) == (heads, scale)
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out',
                           str(tmp_path / 'm.pth')]) == 0
  assert convert_cli.main(['aim', '--src', str(tmp_path / 'm.pth'), '--out',
                           str(tmp_path / 'back')]) == 0
  got_params, got_cfg, info = checkpoints.load_params(str(tmp_path / 'back'))
  assert (got_cfg['heads'], got_cfg['adapters']['scale']) == (heads, scale)
  # The training-time rates (not the official defaults 0.5 and 0.2) come back too.
  assert (got_cfg['dropout_rate'], got_cfg['drop_path_rate']) == (0.0, 0.1)
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'back'), '--out',
                           str(tmp_path / 'again.pth')]) == 0
  import torch
  metas = [json.loads(torch.load(str(tmp_path / f), weights_only=True)['meta']['model_config'])
           for f in ('m.pth', 'again.pth')]
  assert metas[0] == metas[1]
  assert any(n.startswith(f'heads={heads} read from heads of the file\'s meta.model_config')
             for n in info['notices']), info['notices']
  assert not any('guessed' in n or 'official default' in n for n in info['notices'])
  want = build_model(cfg).apply({'params': params}, x)
  got = build_model(got_cfg).apply({'params': got_params}, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_flags_that_contradict_the_exported_meta_are_an_error_naming_both(tmp_path, capsys):
  _random_aim(tmp_path, width=64, heads=4, adapters=dict(scale=0.8))
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out',
                           str(tmp_path / 'm.pth')]) == 0
  capsys.readouterr()
  for flag, value, recorded in (('--heads', '1', 'heads=4 read from heads of'),
                                ('--adapter-scale', '0.5',
                                 'adapter_scale=0.8 read from adapters.scale of')):
    assert convert_cli.main(['aim', '--src', str(tmp_path / 'm.pth'), '--out',
                             str(tmp_path / 'o'), flag, value]) != 0
    err = capsys.readouterr().err
    assert f'{flag} {value}' in err and recorded in err and 'meta.model_config' in err, err
  # Flags that agree with the meta are fine.
  assert convert.load_aim(str(tmp_path / 'm.pth'), heads=4,
                          adapter_scale=0.8).model_config['heads'] == 4


def test_official_file_without_meta_reports_the_guesses(tmp_path):
  _, _, sd = golden('aim_tiny_case1')
  write_mmaction_pth(sd, tmp_path / 'zoo.pth')
  notices = convert.load_aim(str(tmp_path / 'zoo.pth'), log=lambda _: None).report.notices
  assert any(n.startswith('heads=') and 'guessed as width/64: no config records it; pass '
             '--heads' in n for n in notices), notices
  assert any('adapter scale 0.5' in n for n in notices), notices


# -- An existing --out: refused before anything is read; --overwrite replaces checkpoints and
# files, never a training workdir.

_error_line = functools.partial(cli_error_line, prog='convert')


def test_convert_aim_over_an_existing_out(tmp_path, capsys):
  _, _, sd = golden('aim_tiny_case1')
  write_mmaction_pth(sd, tmp_path / 'model.pth')
  other = dict(sd, **{k: 2 * v for k, v in sd.items() if k.startswith('cls_head')})
  write_mmaction_pth(other, tmp_path / 'other.pth')
  out = tmp_path / 'out'
  args = ['--heads', '4', '--adapter-scale', '0.5']
  assert convert_cli.main(['aim', '--src', str(tmp_path / 'model.pth'), '--out', str(out)]
                          + args) == 0
  head = checkpoints.load_params(str(out))[0]['cls_head']['fc_cls']['kernel']
  capsys.readouterr()
  assert convert_cli.main(['aim', '--src', str(tmp_path / 'other.pth'), '--out', str(out)]
                          + args) == 2
  assert _error_line(capsys) == (f'convert: ConversionError: --out {out} exists (a parameter '
                                 'checkpoint): choose a new path, or --overwrite to replace it')
  np.testing.assert_array_equal(
      checkpoints.load_params(str(out))[0]['cls_head']['fc_cls']['kernel'], head)
  assert convert_cli.main(['aim', '--src', str(tmp_path / 'other.pth'), '--out', str(out),
                           '--overwrite'] + args) == 0
  np.testing.assert_array_equal(
      checkpoints.load_params(str(out))[0]['cls_head']['fc_cls']['kernel'], 2 * head)
  # A training workdir (config.json, checkpoints/, frozen/, LOCK): never, even with --overwrite.
  workdir = tmp_path / 'run'
  for sub in ('checkpoints/10', 'frozen'):
    (workdir / sub).mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps({'model': {}, 'metadata': {},
                                                   'config': {'total_steps': 10}}))
  (workdir / 'LOCK').write_text('{}')
  config = (workdir / 'config.json').read_bytes()
  capsys.readouterr()
  assert convert_cli.main(['aim', '--src', str(tmp_path / 'model.pth'), '--out', str(workdir),
                           '--overwrite'] + args) == 2
  assert f'--out {workdir} exists (a training workdir)' in _error_line(capsys)
  assert (workdir / 'config.json').read_bytes() == config
  assert sorted(p.name for p in workdir.iterdir()) == ['LOCK', 'checkpoints', 'config.json',
                                                       'frozen']


def test_export_aim_over_an_existing_file(tmp_path, capsys, monkeypatch):
  from aim_jax.convert import torch_files
  _random_aim(tmp_path)
  pth = tmp_path / 'existing.pth'
  pth.write_bytes(b'another model')
  capsys.readouterr()
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out',
                           str(pth)]) == 2
  assert _error_line(capsys) == (f'convert: ConversionError: --out {pth} exists (a file): '
                                 'choose a new path, or --overwrite to replace it')
  assert pth.read_bytes() == b'another model'
  # A write that fails half-way leaves the old file as it was.
  real = torch_files.save_torch_state_dict

  def fails(blob, path):
    with open(path, 'wb') as f:
      f.write(b'half')
    raise OSError(28, 'No space left on device', path)

  monkeypatch.setattr(torch_files, 'save_torch_state_dict', fails)
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out', str(pth),
                           '--overwrite']) == 2
  assert f'cannot write {pth}: No space left on device' in _error_line(capsys)
  assert pth.read_bytes() == b'another model'
  assert not [p for p in tmp_path.iterdir() if '.tmp-' in p.name]
  monkeypatch.setattr(torch_files, 'save_torch_state_dict', real)
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out', str(pth),
                           '--overwrite']) == 0
  back = torch.load(str(pth), map_location='cpu', weights_only=True)
  assert 'cls_head.fc_cls.weight' in back['state_dict']
  assert not [p for p in tmp_path.iterdir() if '.tmp-' in p.name]
  # Never its own source.
  capsys.readouterr()
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'src'), '--out',
                           str(tmp_path / 'src'), '--overwrite']) == 2
  assert f'--out {tmp_path / "src"} is --src itself' in _error_line(capsys)
