"""CLIP conversion: each ecosystem's own random-weight model, saved its own way, converted by the
command, gives the same image embeddings (and pre-projection features) in Flax; unsafe, truncated
and mismatched checkpoints are refused with an error that names the problem."""

import functools
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision_stub
from conftest import ROOT, cli_error_line

from aim_jax import checkpoints, convert
from aim_jax.convert import cli as convert_cli
from aim_jax.convert import registry, torch_files
from aim_jax.convert.official_names import ConversionError
from aim_jax.models.factory import build_encoder

TOL = 1e-4


def _torch():
  return pytest.importorskip('torch')


def install_fake_torchvision():
  """`clip` and `open_clip` import torchvision for image transforms these tests never use."""
  _torch()
  torchvision_stub.install()


def randomize(model, seed=0):
  """Every tensor random (not the init's zeros/ones), so a missed transpose cannot hide."""
  t = _torch()
  g = t.Generator().manual_seed(seed)
  with t.no_grad():
    for name, p in model.state_dict().items():
      if p.dtype.is_floating_point:
        scale = 0.5 if 'embedding' in name else 0.1
        base = 1.0 if name.endswith(('ln_1.weight', 'ln_2.weight', 'norm1.weight')) else 0.0
        p.copy_(base + scale * t.randn(p.shape, generator=g))
  return model.eval()


def images(n=2, size=32, seed=3):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def torch_images(x):
  return _torch().from_numpy(x.transpose(0, 3, 1, 2).copy())   # NHWC -> NCHW


def run_cli(*args):
  assert convert_cli.main(list(args)) == 0


def flax_outputs(out_dir, x):
  """(embeddings, pre-projection features) of the converted encoder on NHWC images."""
  params, cfg, meta = checkpoints.load_params(str(out_dir))
  # jitted: one compilation of the whole forward instead of one per operation and shape
  emb = jax.jit(build_encoder(cfg).apply)({'params': params}, jnp.asarray(x))
  pre_params = {k: v for k, v in params.items() if k != 'proj'}
  pre = jax.jit(build_encoder(dict(cfg, output_dim=0)).apply)({'params': pre_params},
                                                               jnp.asarray(x))
  return np.asarray(emb), np.asarray(pre), cfg, meta


def torch_visual_outputs(visual, x):
  """CLIP-style visual tower (proj attribute): embeddings and the ln_post class token."""
  t = _torch()
  with t.no_grad():
    emb = visual(torch_images(x)).float().numpy()
    proj = visual.proj
    visual.proj = None
    pre = visual(torch_images(x)).float().numpy()
    visual.proj = proj
  return emb, pre


def assert_close(a, b):
  assert a.shape == b.shape
  err = float(np.max(np.abs(a - b)))
  print(f'max abs error {err:.2e} (scale {float(np.max(np.abs(b))):.2f})')
  assert err < TOL, err


def openai_clip(width=128, layers=2, patch=8, size=32, embed=32, seed=0):
  install_fake_torchvision()
  import clip  # noqa: F401  (clip-anytorch)
  from clip.model import CLIP
  m = CLIP(embed_dim=embed, image_resolution=size, vision_layers=layers, vision_width=width,
           vision_patch_size=patch, context_length=8, vocab_size=100, transformer_width=64,
           transformer_heads=1, transformer_layers=1)
  return randomize(m.float(), seed)


# ---------------------------------------------------------------------------
# OpenAI CLIP.

def save_openai_torchscript(model, path, size):
  """As OpenAI released `ViT-B-16.pt`: the whole CLIP model traced, in float16, jit-saved.

  `model` keeps float32 compute on the float16-rounded weights (the reference).
  """
  t = _torch()
  # OpenAI's archives hold these as 0-d tensors (clip.load reads input_resolution.item()).
  for name, value in (('input_resolution', size), ('context_length', 8), ('vocab_size', 100)):
    if not hasattr(model, name) or not t.is_tensor(getattr(model, name)):
      if hasattr(model, name):
        delattr(model, name)
      model.register_buffer(name, t.tensor(value))
  with t.no_grad():
    model.half().float()
    traced = t.jit.trace(model, (t.zeros(1, 3, size, size), t.zeros(1, 8, dtype=t.long)),
                         check_trace=False)
  traced.half()                     # shares the parameters with `model`
  t.jit.save(traced, str(path))
  model.float()


@pytest.mark.torch
def test_openai_clip_torchscript_archive_reads_without_running_code_and_matches(tmp_path):
  model = openai_clip()
  src = tmp_path / 'ViT-tiny.pt'
  save_openai_torchscript(model, src, 32)          # rounds model weights to float16 values
  x = images()
  ref_emb, ref_pre = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'))
  emb, pre, cfg, meta = flax_outputs(tmp_path / 'out', x)
  assert (cfg['width'], cfg['layers'], cfg['heads'], cfg['patch_size'], cfg['image_size'],
          cfg['output_dim']) == (128, 2, 2, 8, 32, 32)
  assert_close(emb, ref_emb)
  assert_close(pre, ref_pre)
  assert meta['format'] == 'clip'
  assert any('float16' in n for n in meta['notices'])
  assert any(u.startswith('token_embedding') for u in meta['unused'])   # text tower reported
  # 0-d tensors of the archive are reported like every other unused key.
  assert {'logit_scale', 'input_resolution', 'context_length', 'vocab_size'} <= set(
      meta['unused']), meta['unused']
  assert any('heads=2 guessed as width/64' in n for n in meta['notices'])
  assert 'backbone/temporal_embedding' in meta['left_at_init']
  assert any('Adapter' in m for m in meta['left_at_init'])


@pytest.mark.torch
def test_openai_clip_state_dict_and_given_heads(tmp_path, capsys):
  t = _torch()
  install_fake_torchvision()
  from clip.model import CLIP
  # width 64 with 4 heads: not width/64, so --heads is needed (and used).
  model = randomize(CLIP(32, 32, 2, 64, 8, 8, 100, 64, 1, 1).float(), 1)
  model.visual.transformer.resblocks[0].attn.num_heads = 4   # reference runs with 4 heads
  for blk in model.visual.transformer.resblocks:
    blk.attn.num_heads, blk.attn.head_dim = 4, 16
  src = tmp_path / 'clip_sd.pt'
  t.save(model.state_dict(), src)
  x = images(seed=4)
  ref_emb, ref_pre = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'), '--heads', '4')
  emb, pre, cfg, _ = flax_outputs(tmp_path / 'out', x)
  assert cfg['heads'] == 4
  assert_close(emb, ref_emb)
  assert_close(pre, ref_pre)
  printed = capsys.readouterr().out
  for stage in ('[1/4]', '[2/4]', '[3/4]', '[4/4]', 'summary: mapped 32 tensors',
                'unused source keys', 'left at initialisation'):
    assert stage in printed, stage


# ---------------------------------------------------------------------------
# OpenCLIP.

def open_clip_model(seed=2, width=128, layers=2, patch=8, size=32, embed=48, quick_gelu=True):
  install_fake_torchvision()
  import open_clip
  vision = open_clip.model.CLIPVisionCfg(layers=layers, width=width, patch_size=patch,
                                         image_size=size)
  text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=64, heads=1,
                                     layers=1)
  return randomize(open_clip.model.CLIP(embed, vision, text, quick_gelu=quick_gelu), seed)


def write_open_clip_config(directory, quick_gelu=None, width=128, layers=2, patch=8, size=32,
                           embed=48):
  """`open_clip_config.json` as an OpenCLIP hub repository holds it (quick_gelu only when set)."""
  model_cfg = {'embed_dim': embed,
               'vision_cfg': {'image_size': size, 'layers': layers, 'width': width,
                              'patch_size': patch},
               'text_cfg': {'context_length': 8, 'vocab_size': 100, 'width': 64, 'heads': 1,
                            'layers': 1}}
  if quick_gelu is not None:
    model_cfg['quick_gelu'] = quick_gelu
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'open_clip_config.json').write_text(json.dumps(
      {'model_cfg': model_cfg, 'preprocess_cfg': {'mean': [0.48, 0.46, 0.41],
                                                  'std': [0.27, 0.26, 0.28]}}))


@pytest.mark.torch
@pytest.mark.parametrize('ext', ['bin', 'safetensors'])
def test_open_clip_state_dict_matches(tmp_path, ext):
  t = _torch()
  model = open_clip_model()
  src = tmp_path / f'open_clip_model.{ext}'
  if ext == 'bin':
    t.save(model.state_dict(), src)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
  x = images(seed=5)
  ref_emb, ref_pre = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'))
  emb, pre, cfg, meta = flax_outputs(tmp_path / 'out', x)
  assert cfg['output_dim'] == 48
  # The 0-d logit_scale is an unused key whichever container held it.
  assert 'logit_scale' in meta['unused'], meta['unused']
  assert_close(emb, ref_emb)
  assert_close(pre, ref_pre)


def max_error(a, b):
  assert a.shape == b.shape
  return float(np.max(np.abs(a - b)))


@pytest.mark.torch
def test_open_clip_gelu_model_converts_to_clip_gelu_and_matches_only_with_gelu(tmp_path):
  """LAION's OpenCLIP models use exact nn.GELU: the hub download's open_clip_config.json (no
  quick_gelu) selects 'clip_gelu'; forcing QuickGELU on the same weights gives other features."""
  t = _torch()
  model = open_clip_model(seed=9, quick_gelu=False)
  hub = tmp_path / 'snapshot'
  hub.mkdir()
  src = hub / 'open_clip_pytorch_model.bin'
  t.save(model.state_dict(), src)
  write_open_clip_config(hub)
  x = images(seed=11)
  ref_emb, ref_pre = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'auto'))
  emb, pre, cfg, meta = flax_outputs(tmp_path / 'auto', x)
  assert cfg['backbone'] == 'clip_gelu'
  assert any('open_clip_config.json' in n for n in meta['notices'])
  assert max_error(emb, ref_emb) < 1e-5 and max_error(pre, ref_pre) < 1e-5
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'quick'), '--act', 'quick_gelu')
  emb, pre, cfg, _ = flax_outputs(tmp_path / 'quick', x)
  assert cfg['backbone'] == 'clip'
  assert max_error(emb, ref_emb) > 1e-3 and max_error(pre, ref_pre) > 1e-3


@pytest.mark.torch
def test_clip_activation_comes_from_config_then_path_names_then_quick_gelu(tmp_path, capsys):
  t = _torch()
  quick, gelu = open_clip_model(seed=12), open_clip_model(seed=12, quick_gelu=False)
  x = images(seed=13)

  def convert_and_check(model, src, want, *flags):
    src.parent.mkdir(parents=True, exist_ok=True)
    t.save(model.state_dict(), src)
    out = tmp_path / f'out{len(list(tmp_path.glob("out*")))}'
    run_cli('clip', '--src', str(src), '--out', str(out), *flags)
    emb, _, cfg, meta = flax_outputs(out, x)
    assert cfg['backbone'] == want, (src, cfg['backbone'])
    assert max_error(emb, torch_visual_outputs(model.visual, x)[0]) < 1e-5
    return meta

  # A hub repository of an OpenAI-weights model: its config says quick_gelu.
  write_open_clip_config(tmp_path / 'a', quick_gelu=True)
  convert_and_check(quick, tmp_path / 'a' / 'open_clip_pytorch_model.bin', 'clip')
  # No config: the names of a hub cache path, or of OpenCLIP's own downloads.
  convert_and_check(gelu, tmp_path / 'models--laion--CLIP-ViT-tiny' / 'snapshots' / 'f00' /
                    'open_clip_pytorch_model.bin', 'clip_gelu')
  convert_and_check(quick, tmp_path / 'laion' / 'vit_b_32-quickgelu-laion400m_e32.pt', 'clip')
  # Nothing says: QuickGELU (OpenAI's) is assumed and said so; --act gelu converts a GELU model.
  meta = convert_and_check(quick, tmp_path / 'b' / 'weights.bin', 'clip')
  assert any('quick_gelu assumed' in n and '--act gelu' in n for n in meta['notices'])
  convert_and_check(gelu, tmp_path / 'c' / 'weights.bin', 'clip_gelu', '--act', 'gelu')
  assert 'MLP activation gelu (--act)' in capsys.readouterr().out
  # Families with a fixed activation refuse the option rather than ignore it.
  _random_clip_tower_safetensors(tmp_path / 'c.safetensors')
  with pytest.raises(ConversionError, match="--act applies to clip, hf_clip, aim checkpoints, "
                     "not 'siglip'"):
    convert.load_image(str(tmp_path / 'c.safetensors'), 'siglip', act='gelu')


@pytest.mark.torch
def test_hf_clip_gelu_config_converts_to_clip_gelu(tmp_path):
  t = _torch()
  transformers = pytest.importorskip('transformers')
  config = hf_config(heads=4)
  config.hidden_act = 'gelu'
  model = randomize(transformers.CLIPVisionModel(config), 14)
  model.save_pretrained(tmp_path / 'hf')
  x = images(seed=15)
  with t.no_grad():
    ref_pre = model(pixel_values=torch_images(x)).pooler_output.numpy()
  run_cli('clip', '--src', str(tmp_path / 'hf'), '--out', str(tmp_path / 'out'))
  _, pre, cfg, _ = flax_outputs(tmp_path / 'out', x)
  assert cfg['backbone'] == 'clip_gelu'
  assert max_error(pre, ref_pre) < 1e-5
  with pytest.raises(ConversionError, match='hidden_act'):
    convert.load_clip(str(tmp_path / 'hf'), act='quick_gelu')


# ---------------------------------------------------------------------------
# Hugging Face transformers.

def hf_config(width=128, layers=2, heads=2, patch=8, size=32, proj=40):
  import transformers
  return transformers.CLIPVisionConfig(
      hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
      num_attention_heads=heads, image_size=size, patch_size=patch, projection_dim=proj)


@pytest.mark.torch
def test_hf_clip_vision_model_save_pretrained_matches(tmp_path):
  t = _torch()
  transformers = pytest.importorskip('transformers')
  model = randomize(transformers.CLIPVisionModel(hf_config(heads=4)), 3)
  model.save_pretrained(tmp_path / 'hf')
  x = images(seed=6)
  with t.no_grad():
    ref_pre = model(pixel_values=torch_images(x)).pooler_output.numpy()
  # Heads (4, not width/64) come from config.json beside the weights.
  run_cli('clip', '--src', str(tmp_path / 'hf'), '--out', str(tmp_path / 'out'))
  _, pre, cfg, meta = flax_outputs(tmp_path / 'out', x)
  assert cfg['heads'] == 4 and cfg['output_dim'] == 0
  assert meta['format'] == 'hf_clip'
  assert_close(pre, ref_pre)


@pytest.mark.torch
@pytest.mark.parametrize('weights', ['safetensors', 'bin'])
def test_hf_clip_model_with_text_tower_matches(tmp_path, weights):
  t = _torch()
  transformers = pytest.importorskip('transformers')
  text = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=1, vocab_size=100,
                                     max_position_embeddings=8)
  cfg = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=hf_config().to_dict(),
                                projection_dim=40)
  model = randomize(transformers.CLIPModel(cfg), 4)
  if weights == 'safetensors':
    model.save_pretrained(tmp_path / 'hf')
    src = tmp_path / 'hf' / 'model.safetensors'
  else:
    (tmp_path / 'hf').mkdir()
    src = tmp_path / 'hf' / 'pytorch_model.bin'
    t.save(model.state_dict(), src)
  x = images(seed=7)
  with t.no_grad():
    out = model.vision_model(pixel_values=torch_images(x))
    ref_pre = out.pooler_output.numpy()
    ref_emb = model.visual_projection(out.pooler_output).numpy()
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'))
  emb, pre, cfg, meta = flax_outputs(tmp_path / 'out', x)
  assert cfg['output_dim'] == 40
  assert_close(emb, ref_emb)
  assert_close(pre, ref_pre)
  assert any(u.startswith('text_model.') for u in meta['unused'])


# ---------------------------------------------------------------------------
# The real ViT-B/16 shape.

@pytest.mark.torch
@pytest.mark.slow
def test_openai_vit_b16_torchscript_at_real_shape(tmp_path):
  model = openai_clip(width=768, layers=12, patch=16, size=224, embed=512, seed=5)
  src = tmp_path / 'ViT-B-16.pt'
  save_openai_torchscript(model, src, 224)
  x = images(n=1, size=224, seed=8)
  ref_emb, ref_pre = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'))
  emb, pre, cfg, _ = flax_outputs(tmp_path / 'out', x)
  assert (cfg['width'], cfg['layers'], cfg['heads'], cfg['patch_size'], cfg['image_size'],
          cfg['output_dim']) == (768, 12, 12, 16, 224, 512)
  assert_close(emb, ref_emb)
  assert_close(pre, ref_pre)


@pytest.mark.torch
@pytest.mark.slow
def test_open_clip_b16_safetensors_at_real_shape(tmp_path):
  pytest.importorskip('torch')
  from safetensors.torch import save_file
  model = open_clip_model(seed=8, width=768, layers=12, patch=16, size=224, embed=512)
  src = tmp_path / 'open_clip_model.safetensors'
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
  x = images(n=1, size=224, seed=10)
  ref_emb, ref_pre = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'))
  emb, pre, _, _ = flax_outputs(tmp_path / 'out', x)
  assert_close(emb, ref_emb)
  assert_close(pre, ref_pre)


@pytest.mark.torch
@pytest.mark.slow
def test_hf_clip_vision_b16_at_real_shape(tmp_path):
  t = _torch()
  transformers = pytest.importorskip('transformers')
  model = randomize(transformers.CLIPVisionModel(hf_config(768, 12, 12, 16, 224)), 6)
  model.save_pretrained(tmp_path / 'hf')
  x = images(n=1, size=224, seed=9)
  with t.no_grad():
    ref_pre = model(pixel_values=torch_images(x)).pooler_output.numpy()
  run_cli('clip', '--src', str(tmp_path / 'hf'), '--out', str(tmp_path / 'out'))
  _, pre, _, _ = flax_outputs(tmp_path / 'out', x)
  assert_close(pre, ref_pre)


# ---------------------------------------------------------------------------
# Resolution change.

@pytest.mark.torch
def test_positional_embedding_interpolation_is_torch_bicubic(tmp_path, capsys):
  t = _torch()
  pos = np.random.default_rng(0).normal(size=(1 + 4 * 4, 8)).astype(np.float32)
  grid = t.from_numpy(pos[1:].reshape(1, 4, 4, 8)).permute(0, 3, 1, 2)
  for new in (7, 2):
    ref = t.nn.functional.interpolate(grid, size=(new, new), mode='bicubic',
                                      align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(new * new, 8).numpy()
    out = convert.resize_positional_embedding(pos, new)
    np.testing.assert_array_equal(out[0], pos[0])
    np.testing.assert_allclose(out[1:], ref, atol=1e-5)
  temb = np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)
  ref = t.nn.functional.interpolate(t.from_numpy(temb).permute(0, 2, 1), size=8, mode='linear',
                                    align_corners=False).permute(0, 2, 1).numpy()
  np.testing.assert_allclose(convert.resize_temporal_embedding(temb, 8), ref, atol=1e-6)

  model = open_clip_model(seed=7)
  src = tmp_path / 'oc.bin'
  t.save(model.state_dict(), src)
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'out'), '--image-size', '48')
  assert 'NOTICE: positional embedding interpolated (bicubic)' in capsys.readouterr().out
  emb, _, cfg, meta = flax_outputs(tmp_path / 'out', images(size=48))
  assert cfg['image_size'] == 48 and emb.shape == (2, 48)
  assert any('interpolated' in n for n in meta['notices'])


# ---------------------------------------------------------------------------
# Safety and errors.

class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.torch
def test_checkpoint_that_would_run_code_is_refused(tmp_path):
  t = _torch()
  marker = tmp_path / 'pwned'
  zipped = tmp_path / 'evil.pth'
  t.save({'state_dict': {'w': t.zeros(2)}, 'meta': _RunsCode(marker)}, zipped)
  raw = tmp_path / 'evil_legacy.pt'
  with open(raw, 'wb') as f:
    pickle.dump({'w': _RunsCode(marker)}, f, protocol=2)
  for path in (zipped, raw):
    with pytest.raises(torch_files.UnsafeCheckpointError, match='system'):
      torch_files.load(str(path))
    assert convert_cli.main(['aim', '--src', str(path), '--out', str(tmp_path / 'o')]) == 2
  assert not marker.exists()


def _small_openai_state_dict():
  install_fake_torchvision()
  from clip.model import CLIP
  model = randomize(CLIP(32, 32, 2, 128, 8, 8, 100, 64, 1, 1).float(), 9)
  return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.torch
def test_truncated_files_give_the_named_error(tmp_path):
  t = _torch()
  sd = _small_openai_state_dict()
  full = tmp_path / 'full.pt'
  t.save(sd, full)
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'full.safetensors'))
  for name in ('full.pt', 'full.safetensors'):
    blob = (tmp_path / name).read_bytes()
    cut = tmp_path / ('cut_' + name)
    cut.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(torch_files.TruncatedCheckpointError, match='cut_'):
      torch_files.load_state_dict(str(cut))


@pytest.mark.torch
def test_missing_key_and_wrong_shape_name_the_key(tmp_path):
  t = _torch()
  sd = _small_openai_state_dict()
  missing = dict(sd)
  del missing['visual.transformer.resblocks.1.ln_2.weight']
  t.save(missing, tmp_path / 'missing.pt')
  with pytest.raises(ConversionError, match=r"missing key 'visual\.transformer\.resblocks\.1"
                                            r"\.ln_2\.weight'"):
    convert.load_clip(str(tmp_path / 'missing.pt'))
  wrong = dict(sd)
  wrong['visual.transformer.resblocks.1.mlp.c_fc.weight'] = t.zeros(300, 128)
  wrong['visual.transformer.resblocks.1.mlp.c_fc.bias'] = t.zeros(300)
  t.save(wrong, tmp_path / 'wrong.pt')
  with pytest.raises(ConversionError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_fc\."
                                            r"(weight|bias).*shape"):
    convert.load_clip(str(tmp_path / 'wrong.pt'))
  # NaN or infinite values are damage, not weights: refused, naming the source key.
  damaged = dict(sd)
  bad = damaged['visual.transformer.resblocks.0.attn.out_proj.weight'].clone()
  bad[0, :3] = float('nan')
  damaged['visual.transformer.resblocks.0.attn.out_proj.weight'] = bad
  t.save(damaged, tmp_path / 'nan.pt')
  with pytest.raises(ConversionError, match=r"key 'visual\.transformer\.resblocks\.0\.attn\."
                                            r"out_proj\.weight' -> .*: 3 of \d+ values are NaN"):
    convert.load_clip(str(tmp_path / 'nan.pt'))
  # A checkpoint of another kind is refused by detection, naming the known formats.
  t.save({'foo.weight': t.zeros(2)}, tmp_path / 'other.pt')
  with pytest.raises(ConversionError, match='no registered image format'):
    convert.load_clip(str(tmp_path / 'other.pt'))


def test_library_and_safetensors_conversion_work_without_torch(tmp_path):
  """torch is a conversion/test extra: blocked, the library imports, converts and runs."""
  _random_clip_tower_safetensors(tmp_path / 'c.safetensors')
  code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name == 'torch' or name.startswith('torch.'):
      raise ImportError('torch is blocked in this test')
sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp
import aim_jax, aim_jax.convert.cli as C
from aim_jax.models.factory import build_encoder, build_model
assert C.main(['clip', '--src', {str(tmp_path / 'c.safetensors')!r}, '--out',
               {str(tmp_path / 'out')!r}]) == 0
from aim_jax import checkpoints
params, cfg, _ = checkpoints.load_params({str(tmp_path / 'out')!r})
y = build_encoder(cfg).apply({{'params': params}}, jnp.zeros((1, 32, 32, 3)))
assert y.shape == (1, 16), y.shape
assert 'torch' not in sys.modules
print('OK')
"""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                     timeout=300, check=False)
  assert r.returncode == 0 and 'OK' in r.stdout, r.stderr[-3000:]


def test_registry_dispatch_lists_clip_and_aim_formats():
  known = registry.all_formats()
  assert {'clip', 'hf_clip', 'aim'} <= set(known)
  assert known['aim'].kind == 'aim' and known['clip'].kind == 'image'
  keys = ['visual.conv1.weight', 'visual.transformer.resblocks.0.ln_1.weight']
  assert [f.name for f in registry.detect(keys)] == ['clip']
  hf = ['vision_model.embeddings.patch_embedding.weight', 'vision_model.embeddings.class_embedding',
        'vision_model.encoder.layers.0.self_attn.q_proj.weight']
  assert 'hf_clip' in [f.name for f in registry.detect(hf)]
  # SigLIP's HF tower has the same names but no class token: not CLIP.
  assert 'hf_clip' not in [f.name for f in registry.detect(hf[:1] + hf[2:])]


@pytest.mark.torch
def test_image_detection_tells_hf_clip_from_hf_siglip(tmp_path):
  """Both name their embeddings alike; only CLIP has a class token: each file is detected as
  exactly its own format, and `convert image` needs no --format for either."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  siglip_vision = transformers.SiglipVisionConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
      image_size=32, patch_size=8)
  siglip_text = transformers.SiglipTextConfig(hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=1, num_attention_heads=1,
                                              vocab_size=100, max_position_embeddings=8)
  clip_text = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=1,
                                          vocab_size=100, max_position_embeddings=8)
  models = {
      'hf_clip': [transformers.CLIPVisionModel(hf_config(64, 1, 1)),
                  transformers.CLIPModel(transformers.CLIPConfig(
                      text_config=clip_text.to_dict(),
                      vision_config=hf_config(64, 1, 1).to_dict()))],
      'siglip': [transformers.SiglipVisionModel(siglip_vision),
                 transformers.SiglipModel(transformers.SiglipConfig(
                     text_config=siglip_text.to_dict(), vision_config=siglip_vision.to_dict()))],
  }
  registry.all_formats()
  for want, instances in models.items():
    for model in instances:
      found = [f.name for f in registry.detect(model.state_dict(), 'image')]
      assert found == [want], (type(model).__name__, found)
  for want, model in (('hf_clip', models['hf_clip'][0]), ('siglip', models['siglip'][0])):
    model.save_pretrained(tmp_path / want)
    run_cli('image', '--src', str(tmp_path / want), '--out', str(tmp_path / f'{want}_out'))
    assert checkpoints.load_params(str(tmp_path / f'{want}_out'))[2]['format'] == want


def _random_clip_tower_safetensors(path, d=64, p=8, g=4, layers=1, embed=16, seed=0):
  """A CLIP state dict (visual.* keys plus one text-side key) written without torch."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  sd = {'visual.conv1.weight': rng.normal(size=(d, 3, p, p)),
        'visual.class_embedding': rng.normal(size=(d,)),
        'visual.positional_embedding': rng.normal(size=(g * g + 1, d)),
        'visual.proj': rng.normal(size=(d, embed)),
        'visual.ln_pre.weight': np.ones(d), 'visual.ln_pre.bias': np.zeros(d),
        'visual.ln_post.weight': np.ones(d), 'visual.ln_post.bias': np.zeros(d),
        'logit_scale': np.ones(())}
  for i in range(layers):
    for k, shape in (('attn.in_proj_weight', (3 * d, d)), ('attn.in_proj_bias', (3 * d,)),
                     ('attn.out_proj.weight', (d, d)), ('attn.out_proj.bias', (d,)),
                     ('ln_1.weight', (d,)), ('ln_1.bias', (d,)), ('ln_2.weight', (d,)),
                     ('ln_2.bias', (d,)), ('mlp.c_fc.weight', (4 * d, d)),
                     ('mlp.c_fc.bias', (4 * d,)), ('mlp.c_proj.weight', (d, 4 * d)),
                     ('mlp.c_proj.bias', (d,))):
      sd[f'visual.transformer.resblocks.{i}.{k}'] = rng.normal(size=shape)
  save_file({k: np.asarray(v, np.float32) for k, v in sd.items()}, str(path))
  return sd


@pytest.mark.slow
def test_converted_clip_is_what_training_init_from_loads(tmp_path):
  """The written directory is the contract with `--config.init_from`: the encoder goes into
  params['backbone'], adapters / temporal embedding / head stay at init, proj is dropped."""
  import flax.linen as nn
  from aim_jax.models.factory import build_model, resolve_model_config
  sd = _random_clip_tower_safetensors(tmp_path / 'c.safetensors', layers=2)
  assert convert_cli.main(['clip', '--src', str(tmp_path / 'c.safetensors'), '--out',
                           str(tmp_path / 'out')]) == 0
  cfg = resolve_model_config(dict(width=64, layers=2, heads=1, patch_size=8, image_size=32,
                                  num_frames=2, num_classes=3))
  x = jnp.zeros((1, 2, 32, 32, 3))
  params = jax.tree.map(np.asarray, nn.unbox(build_model(cfg).init(jax.random.key(0), x))['params'])
  merged, at_init = checkpoints.load_init_from(str(tmp_path / 'out'), params, cfg)
  np.testing.assert_array_equal(merged['backbone']['conv1']['kernel'],
                                sd['visual.conv1.weight'].astype(np.float32).transpose(2, 3, 1, 0))
  assert 'backbone/temporal_embedding' in at_init and 'cls_head/fc_cls/kernel' in at_init
  assert not any(k.startswith('backbone/resblocks_0/attn') for k in at_init)


@pytest.mark.torch
def test_every_torch_container_reads_the_same_tensors(tmp_path):
  """zip (torch>=1.6), legacy stream (pre-1.6, via weights_only), safetensors, views and dtypes."""
  t = _torch()
  from safetensors.torch import save_file
  base = t.arange(24, dtype=t.float32).reshape(4, 6)
  sd = {'t': base.t(), 'view': base[1:3, 2:], 'half': base.half(), 'bf16': base.bfloat16(),
        'long': t.arange(5), 'scalar': t.tensor(3.5)}
  t.save(sd, tmp_path / 'zip.pt')
  t.save(sd, tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'st.safetensors'))
  for name in ('zip.pt', 'legacy.pt', 'st.safetensors'):
    got = torch_files.load_state_dict(str(tmp_path / name))
    assert set(got) == set(sd), name
    for k, v in sd.items():
      np.testing.assert_array_equal(np.asarray(got[k], np.float64), v.double().numpy(),
                                    err_msg=f'{name}:{k}')
      assert got[k].shape == tuple(v.shape)
      assert isinstance(got[k], np.ndarray), (name, k, type(got[k]))   # 0-d too


@pytest.mark.torch
def test_open_clip_config_head_width_gives_the_heads(tmp_path):
  """OpenCLIP builds width / head_width heads; a head_width of 32 is not width/64."""
  t = _torch()
  install_fake_torchvision()
  import open_clip
  vision = open_clip.model.CLIPVisionCfg(layers=2, width=128, head_width=32, patch_size=8,
                                         image_size=32)
  text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=64, heads=1,
                                     layers=1)
  model = randomize(open_clip.model.CLIP(48, vision, text, quick_gelu=True), 7)
  assert model.visual.transformer.resblocks[0].attn.num_heads == 4
  t.save(model.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
  write_open_clip_config(tmp_path, quick_gelu=True)
  blob = json.loads((tmp_path / 'open_clip_config.json').read_text())
  blob['model_cfg']['vision_cfg']['head_width'] = 32
  (tmp_path / 'open_clip_config.json').write_text(json.dumps(blob))
  x = images(seed=7)
  ref_emb, _ = torch_visual_outputs(model.visual, x)
  run_cli('clip', '--src', str(tmp_path), '--out', str(tmp_path / 'out'))
  emb, _, cfg, meta = flax_outputs(tmp_path / 'out', x)
  assert cfg['heads'] == 4
  assert any('head_width=32' in n for n in meta['notices']), meta['notices']
  assert_close(emb, ref_emb)
  with pytest.raises(ConversionError, match=r'--heads 2 contradicts .*head_width=32'):
    convert.load_clip(str(tmp_path), heads=2, log=lambda _: None)


# ---------------------------------------------------------------------------
# Where the output goes: an existing --out is refused before anything is read.

_error_line = functools.partial(cli_error_line, prog='convert')


def _snapshot(path):
  """Every file under `path` (or the file itself) with its bytes: what must not change."""
  path = str(path)
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      return {'': f.read()}
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path) + '/'] = None
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return out


def _leftovers(directory):
  return sorted(p for p in os.listdir(directory) if '.tmp-' in p or '.old-' in p)


def _fake_workdir(path, marker):
  """A training workdir as `python -m aim_jax.train` leaves it, recognised by `marker`."""
  os.makedirs(path)
  blob = {'model': {'variant': 'Ti/16'}, 'metadata': {}}
  if marker == 'config':
    blob['config'] = {'total_steps': 10}           # what checkpoints.start_run writes
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(blob, f)
  if marker in ('checkpoints', 'frozen', 'best'):
    os.makedirs(os.path.join(path, marker, '5'))
  elif marker == 'LOCK':
    with open(os.path.join(path, 'LOCK'), 'w') as f:
      f.write('{"host": "h", "pid": 1}')


@pytest.fixture
def clip_ckpt(tmp_path):
  """(a converted parameter checkpoint, its source, a second source with other weights)."""
  _random_clip_tower_safetensors(tmp_path / 'c.safetensors')
  _random_clip_tower_safetensors(tmp_path / 'c2.safetensors', seed=1)
  run_cli('clip', '--src', str(tmp_path / 'c.safetensors'), '--out', str(tmp_path / 'ckpt'))
  return tmp_path / 'ckpt', tmp_path / 'c.safetensors', tmp_path / 'c2.safetensors'


def _conv1(ckpt):
  return checkpoints.load_params(str(ckpt))[0]['conv1']['kernel']


def test_an_existing_out_is_refused_before_anything_is_read(clip_ckpt, tmp_path, capsys):
  ckpt, _, _ = clip_ckpt
  before = _snapshot(ckpt)
  missing = str(tmp_path / 'missing.safetensors')    # read first, it would be the error
  for args in (['clip', '--src', missing], ['image', '--src', missing],
               ['aim', '--src', missing], ['export-params', '--src', missing]):
    capsys.readouterr()
    assert convert_cli.main(args + ['--out', str(ckpt)]) == 2, args
    line = _error_line(capsys)
    assert line == (f'convert: ConversionError: --out {ckpt} exists (a parameter checkpoint): '
                    'choose a new path, or --overwrite to replace it'), line
  assert _snapshot(ckpt) == before
  # A file, where a directory is written: refused with or without --overwrite.
  note = tmp_path / 'notes.txt'
  note.write_text('precious')
  for extra in ([], ['--overwrite']):
    assert convert_cli.main(['clip', '--src', missing, '--out', str(note)] + extra) == 2
    assert f'--out {note} exists (a file) and the output is a directory' in _error_line(capsys)
  # A non-empty directory that is no parameter checkpoint: never replaced.
  other = tmp_path / 'project'
  other.mkdir()
  (other / 'train.py').write_text('print(1)')
  for extra in ([], ['--overwrite']):
    assert convert_cli.main(['clip', '--src', missing, '--out', str(other)] + extra) == 2
    assert f'--out {other} exists (a non-empty directory' in _error_line(capsys)
  assert note.read_text() == 'precious' and _snapshot(other) == {'train.py': b'print(1)'}
  # export-aim writes a file: an existing file, or a directory, is refused too.
  for out in (note, other, ckpt):
    assert convert_cli.main(['export-aim', '--src', missing, '--out', str(out)]) == 2
    assert f'--out {out} exists (' in _error_line(capsys)
  assert note.read_text() == 'precious' and _snapshot(ckpt) == before


def test_an_empty_directory_is_written_into(clip_ckpt, tmp_path):
  _, src, _ = clip_ckpt
  (tmp_path / 'empty').mkdir()
  run_cli('clip', '--src', str(src), '--out', str(tmp_path / 'empty'))
  assert checkpoints.is_params_checkpoint(str(tmp_path / 'empty'))
  np.testing.assert_array_equal(_conv1(tmp_path / 'empty'), _conv1(clip_ckpt[0]))


@pytest.mark.parametrize('marker', ['checkpoints', 'frozen', 'best', 'LOCK', 'config'])
def test_a_training_workdir_is_never_replaced(clip_ckpt, tmp_path, capsys, marker):
  ckpt, src, _ = clip_ckpt
  workdir = tmp_path / 'run'
  _fake_workdir(str(workdir), marker)
  before = _snapshot(workdir)
  for args in (['clip', '--src', str(src)], ['aim', '--src', str(src)],
               ['export-params', '--src', str(ckpt)], ['export-aim', '--src', str(ckpt)]):
    capsys.readouterr()
    assert convert_cli.main(args + ['--out', str(workdir), '--overwrite']) == 2, args
    line = _error_line(capsys)
    assert f'--out {workdir} exists (a training workdir): a workdir is never replaced' in line
  # Its own source: named as such.
  assert convert_cli.main(['export-params', '--src', str(workdir), '--out', str(workdir),
                           '--overwrite']) == 2
  assert f'--out {workdir} is --src itself (a training workdir)' in _error_line(capsys)
  assert _snapshot(workdir) == before and _leftovers(tmp_path) == []


def test_overwrite_replaces_a_parameter_checkpoint_once_the_new_one_is_complete(
    clip_ckpt, tmp_path, capsys, monkeypatch):
  ckpt, src, src2 = clip_ckpt
  first = _conv1(ckpt)
  run_cli('clip', '--src', str(src2), '--out', str(ckpt), '--overwrite')
  second = _conv1(ckpt)
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(_conv1(ckpt), second)
  assert checkpoints.load_params(str(ckpt))[2]['source'] == str(src2)
  assert _leftovers(tmp_path) == []
  # A write that fails half-way leaves the old checkpoint as it was.
  before = _snapshot(ckpt)
  real = checkpoints.save_params

  def fails(path, *args, **kwargs):
    real(path, *args, **kwargs)
    raise OSError(28, 'No space left on device', path)

  monkeypatch.setattr(checkpoints, 'save_params', fails)
  capsys.readouterr()
  assert convert_cli.main(['clip', '--src', str(src), '--out', str(ckpt), '--overwrite']) == 2
  assert f'ConversionError: cannot write {ckpt}: No space left on device' in _error_line(capsys)
  assert _snapshot(ckpt) == before and _leftovers(tmp_path) == []
  monkeypatch.setattr(checkpoints, 'save_params', real)
  # export-params: the same rule.
  out = tmp_path / 'exported'
  assert convert_cli.main(['export-params', '--src', str(ckpt), '--out', str(out)]) == 0
  assert convert_cli.main(['export-params', '--src', str(ckpt), '--out', str(out)]) == 2
  assert f'--out {out} exists (a parameter checkpoint)' in _error_line(capsys)
  assert convert_cli.main(['export-params', '--src', str(ckpt), '--out', str(out),
                           '--overwrite']) == 0
  np.testing.assert_array_equal(_conv1(out), second)
  assert _leftovers(tmp_path) == []


def test_overwrite_never_replaces_the_source(clip_ckpt, tmp_path, capsys):
  ckpt, src, _ = clip_ckpt
  before = _snapshot(ckpt)
  os.symlink(ckpt, tmp_path / 'link')
  for out in (ckpt, tmp_path / 'link', str(ckpt) + '/'):
    assert convert_cli.main(['export-params', '--src', str(ckpt), '--out', str(out),
                             '--overwrite']) == 2
    assert f'--out {out} is --src itself (a parameter checkpoint)' in _error_line(capsys)
  assert convert_cli.main(['clip', '--src', str(src), '--out', str(src), '--overwrite']) == 2
  assert f'--out {src} is --src itself (a file)' in _error_line(capsys)
  # A parameter checkpoint that holds the source file.
  inner = ckpt / 'c.safetensors'
  inner.write_bytes(src.read_bytes())
  before = _snapshot(ckpt)
  assert convert_cli.main(['clip', '--src', str(inner), '--out', str(ckpt), '--overwrite']) == 2
  assert f'--out {ckpt} (a parameter checkpoint) holds --src {inner}' in _error_line(capsys)
  assert _snapshot(ckpt) == before


def test_out_under_a_file_is_one_line(clip_ckpt, tmp_path, capsys):
  ckpt, src, _ = clip_ckpt
  note = tmp_path / 'notes.txt'
  note.write_text('precious')
  for args, out in ((['clip', '--src', str(src)], note / 'sub'),
                    (['export-params', '--src', str(ckpt)], note / 'a' / 'b'),
                    (['export-aim', '--src', str(ckpt)], note / 'm.pth')):
    assert convert_cli.main(args + ['--out', str(out)]) == 2, args
    assert f'--out {out}: {note} is a file, not a directory' in _error_line(capsys)
  assert note.read_text() == 'precious'


@pytest.mark.parametrize('flag,value,allowed', [
    ('--image-size', '-8', 'must be a positive multiple of the patch size'),
    ('--image-size', '0', 'must be a positive multiple of the patch size'),
    ('--num-frames', '-3', 'the number of frames must be >= 1'),
    ('--num-frames', '0', 'the number of frames must be >= 1'),
    ('--heads', '0', 'the number of attention heads must be >= 1'),
    ('--heads', '-2', 'the number of attention heads must be >= 1')])
def test_a_numeric_flag_out_of_range_is_one_line_naming_it(tmp_path, capsys, flag, value,
                                                            allowed):
  _random_clip_tower_safetensors(tmp_path / 'c.safetensors')
  for command in ('clip', 'image'):
    assert convert_cli.main([command, '--src', str(tmp_path / 'c.safetensors'), '--out',
                             str(tmp_path / 'out'), flag, value]) == 2
    assert _error_line(capsys) == f'convert: ConversionError: {flag} {value}: {allowed}'
  assert not (tmp_path / 'out').exists()
  option = flag[2:].replace('-', '_')
  with pytest.raises(ConversionError, match=f'{flag} {value}: '):
    convert.load_clip(str(tmp_path / 'c.safetensors'), log=lambda _: None,
                      **{option: int(value)})


def _npz_sources(tmp_path):
  """Damaged or foreign `.npz` files -> {path: what the message says}."""
  import zipfile
  good = tmp_path / 'good.npz'
  np.savez(good, **{'Transformer/encoder_norm/scale': np.ones(64, np.float32),
                    'embedding/kernel': np.zeros((8, 8, 3, 64), np.float32)})
  blob = good.read_bytes()
  files = {'garbage.npz': (b'garbage, not an archive' * 4, 'not a numpy .npz archive'),
           'truncated.npz': (blob[:len(blob) // 2], 'truncated or corrupt'),
           'empty.npz': (b'', 'empty file')}
  for name, (data, _) in files.items():
    (tmp_path / name).write_bytes(data)
  with zipfile.ZipFile(tmp_path / 'zip.npz', 'w') as z:
    z.writestr('readme.txt', 'a zip file, not numpy')
  files['zip.npz'] = (None, "member 'readme.txt' is not a numpy array")
  np.savez(tmp_path / 'objects.npz', a=np.array([{'x': 1}], dtype=object))
  files['objects.npz'] = (None, "array 'a' holds pickled Python objects, which are never loaded")
  np.save(tmp_path / 'single.npy', np.zeros(3))
  os.rename(tmp_path / 'single.npy', tmp_path / 'single.npz')
  files['single.npz'] = (None, 'a single .npy array, not an .npz archive')
  return {tmp_path / name: why for name, (_, why) in files.items()}


def test_a_damaged_or_foreign_npz_is_one_line_naming_the_file(tmp_path, capsys):
  for path, why in _npz_sources(tmp_path).items():
    for extra in ([], ['--format', 'google_vit_npz']):
      assert convert_cli.main(['image', '--src', str(path), '--out', str(tmp_path / 'o')]
                              + extra) == 2, path
      line = _error_line(capsys)
      assert line.startswith(f'convert: ConversionError: {path}: ') and why in line, line
  assert not (tmp_path / 'o').exists()


def test_garbage_torch_and_safetensors_files_are_one_line_naming_the_file(tmp_path, capsys):
  for name, data in (('g.pth', b'garbage, not a checkpoint' * 4), ('e.pth', b''),
                     ('g.safetensors', b'garbage, not a checkpoint' * 4),
                     ('e.safetensors', b'')):
    (tmp_path / name).write_bytes(data)
    assert convert_cli.main(['image', '--src', str(tmp_path / name), '--out',
                             str(tmp_path / 'o')]) == 2, name
    line = _error_line(capsys)
    assert line.startswith('convert: ') and f'{tmp_path / name}' in line, line
