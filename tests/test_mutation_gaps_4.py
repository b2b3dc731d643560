"""Fourth round of mutation testing (checkpoint conversion, aim_jax/convert): each test pins
behaviour that docs/conversion.md, docs/state_dict_names.md, the convert modules' doc strings
or the source library's own file format document, and that a plausible refactoring mistake
could change without another test failing. Expectations come from those documents or from
arithmetic, not from the converter's own output. Models are tiny and mostly written as numpy
safetensors, so most tests need no torch."""

import json

import numpy as np
import pytest
from conftest import GOLDEN, cli_error_line

from aim_jax import checkpoints
from aim_jax import convert
from aim_jax import params as P
from aim_jax.convert import cli as convert_cli
from aim_jax.convert import torch_files
from aim_jax.errors import ConversionError

save_file = pytest.importorskip('safetensors.numpy').save_file


def _quiet(_):
  pass


def _clip_sd(d=64, p=8, g=4, layers=1, embed=16, seed=0, prefix='visual.'):
  """An OpenAI / OpenCLIP visual tower (docs/state_dict_names.md#clip), random float32."""
  rng = np.random.default_rng(seed)
  sd = {'conv1.weight': rng.normal(size=(d, 3, p, p)), 'class_embedding': rng.normal(size=(d,)),
        'positional_embedding': rng.normal(size=(g * g + 1, d)),
        'proj': rng.normal(size=(d, embed)),
        'ln_pre.weight': 1 + 0.1 * rng.normal(size=d), 'ln_pre.bias': rng.normal(size=d),
        'ln_post.weight': 1 + 0.1 * rng.normal(size=d), 'ln_post.bias': rng.normal(size=d)}
  for i in range(layers):
    for k, shape in (('attn.in_proj_weight', (3 * d, d)), ('attn.in_proj_bias', (3 * d,)),
                     ('attn.out_proj.weight', (d, d)), ('attn.out_proj.bias', (d,)),
                     ('ln_1.weight', (d,)), ('ln_1.bias', (d,)), ('ln_2.weight', (d,)),
                     ('ln_2.bias', (d,)), ('mlp.c_fc.weight', (4 * d, d)),
                     ('mlp.c_fc.bias', (4 * d,)), ('mlp.c_proj.weight', (d, 4 * d)),
                     ('mlp.c_proj.bias', (d,))):
      sd[f'transformer.resblocks.{i}.{k}'] = rng.normal(size=shape)
  return {prefix + k: np.asarray(v, np.float32) for k, v in sd.items()}


def _timm_sd(d=64, p=8, g=4, layers=1, seed=0):
  """A timm VisionTransformer state dict (docs/state_dict_names.md#vit-in21k), random."""
  rng = np.random.default_rng(seed)
  sd = {'patch_embed.proj.weight': rng.normal(size=(d, 3, p, p)),
        'patch_embed.proj.bias': rng.normal(size=d), 'cls_token': rng.normal(size=(1, 1, d)),
        'pos_embed': rng.normal(size=(1, g * g + 1, d)),
        'norm.weight': 1 + 0.1 * rng.normal(size=d), 'norm.bias': rng.normal(size=d)}
  for i in range(layers):
    for k, shape in (('norm1.weight', (d,)), ('norm1.bias', (d,)), ('norm2.weight', (d,)),
                     ('norm2.bias', (d,)), ('attn.qkv.weight', (3 * d, d)),
                     ('attn.qkv.bias', (3 * d,)), ('attn.proj.weight', (d, d)),
                     ('attn.proj.bias', (d,)), ('mlp.fc1.weight', (4 * d, d)),
                     ('mlp.fc1.bias', (4 * d,)), ('mlp.fc2.weight', (d, 4 * d)),
                     ('mlp.fc2.bias', (d,))):
      sd[f'blocks.{i}.{k}'] = rng.normal(size=shape)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _save(path, sd):
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  return str(path)


def _golden_sd(name):
  d = np.load(GOLDEN / f'{name}.npz')
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  sd.update({k[4:]: d[k] for k in d.files if k.startswith('buf/')})
  return sd


def _flat(conv):
  return {k: np.asarray(v) for k, v in P.flatten(conv.params).items()}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ----- reading: containers and wrappers -----------------------------------------------------

def test_a_pytorch_general_checkpoint_reads_its_model_state_dict(tmp_path):
  """PyTorch's documented 'general checkpoint' is {'epoch', 'model_state_dict',
  'optimizer_state_dict', ...}: the model's tensors are those under model_state_dict."""
  torch = pytest.importorskip('torch')
  sd = _clip_sd()
  plain = _save(tmp_path / 'plain.safetensors', sd)
  torch.save({'epoch': 3, 'model_state_dict': {k: torch.from_numpy(v) for k, v in sd.items()},
              'optimizer_state_dict': {'state': {}, 'param_groups': [{'lr': 0.1}]},
              'loss': 0.25}, tmp_path / 'general.pt')
  got = convert.load_clip(str(tmp_path / 'general.pt'), log=_quiet)
  _assert_same_params(got, convert.load_clip(plain, log=_quiet))


def test_a_distributed_data_parallel_state_dict_loses_its_module_prefix(tmp_path):
  """DistributedDataParallel.state_dict() names every key `module.<key>`: the timm ViT it wraps
  is detected and converted as if saved unwrapped."""
  sd = _timm_sd()
  plain = convert.load_image(_save(tmp_path / 'plain.safetensors', sd), log=_quiet)
  ddp = _save(tmp_path / 'ddp.safetensors', {'module.' + k: v for k, v in sd.items()})
  got = convert.load_image(ddp, log=_quiet)
  assert got.format == 'timm_vit'
  _assert_same_params(got, plain)
  assert not got.report.unused


def test_a_sharded_hugging_face_directory_reads_every_shard(tmp_path):
  """transformers' sharded save: model.safetensors.index.json maps each key to its shard; the
  tensors of all shards together are the model."""
  sd = _clip_sd(layers=2)
  keys = sorted(sd)
  shards = {'model-00001-of-00002.safetensors': keys[:len(keys) // 2],
            'model-00002-of-00002.safetensors': keys[len(keys) // 2:]}
  hub = tmp_path / 'hub'
  for name, part in shards.items():
    _save(hub / name, {k: sd[k] for k in part})
  (hub / 'model.safetensors.index.json').write_text(json.dumps({
      'metadata': {'total_size': int(sum(v.nbytes for v in sd.values()))},
      'weight_map': {k: name for name, part in shards.items() for k in part}}))
  got = convert.load_clip(str(hub), log=_quiet)
  assert len(got.report.mapped) == len(sd)
  _assert_same_params(got, convert.load_clip(_save(tmp_path / 'one.safetensors', sd), log=_quiet))


def test_bfloat16_weights_are_stored_as_float32(tmp_path):
  """Conversion.params are 'float32 numpy'; a bfloat16 file is cast (exactly: every bfloat16
  is a float32) and the report says so."""
  import ml_dtypes
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _clip_sd().items()}
  conv = convert.load_clip(_save(tmp_path / 'bf16.safetensors', sd), log=_quiet)
  flat = _flat(conv)
  assert {str(v.dtype) for v in flat.values()} == {'float32'}
  np.testing.assert_array_equal(flat['conv1/kernel'],
                                sd['visual.conv1.weight'].astype(np.float32).transpose(2, 3, 1, 0))
  assert any('bfloat16' in n and 'float32' in n for n in conv.report.notices)


# ----- detection, options and checks -------------------------------------------------------

def test_keys_that_match_two_formats_are_an_error_naming_both(tmp_path):
  """Detection never picks between formats: keys of a bare CLIP tower and of a timm ViT in one
  file match both, and the user has to say which (--format)."""
  src = _save(tmp_path / 'both.safetensors', dict(_clip_sd(prefix=''), **_timm_sd()))
  with pytest.raises(ConversionError, match='several formats') as e:
    convert.load_image(src, log=_quiet)
  assert 'clip' in str(e.value) and 'timm_vit' in str(e.value) and '--format' in str(e.value)


def test_a_format_of_the_other_kind_is_refused(tmp_path, capsys):
  """`image --format NAME` takes image-model formats (encoder params); 'aim' converts a whole
  AIM model, which is the `aim` command's."""
  src = _save(tmp_path / 'aim.safetensors', _golden_sd('aim_tiny_case1'))
  with pytest.raises(ConversionError, match="'aim'.*not image"):
    convert.load_image(src, 'aim', heads=4, log=_quiet)
  assert convert_cli.main(['image', '--src', src, '--out', str(tmp_path / 'o'), '--format', 'aim',
                           '--heads', '4']) == 2
  assert "'aim'" in cli_error_line(capsys, 'convert')
  assert not (tmp_path / 'o').exists()


def test_heads_for_a_swin_are_refused_not_ignored(tmp_path):
  """docs/conversion.md: a Swin's head counts are read exactly from its bias tables (2 and 4
  here); a --heads the format does not take is an error, never silently dropped."""
  src = _save(tmp_path / 'aim_swin.safetensors', _golden_sd('aim_swin2d_tiny_case1'))
  assert convert.load_aim(src, log=_quiet).model_config['swin']['num_heads'] == (2, 4)
  with pytest.raises(ConversionError, match='heads'):
    convert.load_aim(src, heads=3, log=_quiet)


def test_a_tensor_the_image_model_has_no_place_for_is_an_error_naming_it(tmp_path):
  """A CLIP image tower has no adapters: a temporal adapter in the file cannot be converted
  into it, and the error names the source key (verify: 'the error names the key')."""
  sd = _clip_sd()
  sd['visual.transformer.resblocks.0.T_Adapter.D_fc1.weight'] = np.ones((16, 64), np.float32)
  with pytest.raises(ConversionError,
                     match=r'visual\.transformer\.resblocks\.0\.T_Adapter\.D_fc1\.weight'):
    convert.load_clip(_save(tmp_path / 'c.safetensors', sd), log=_quiet)


def test_an_image_size_that_is_not_a_multiple_of_the_patch_is_one_line(tmp_path, capsys):
  """--image-size must be a multiple of the patch size: 44 px of 8 px patches is no grid."""
  src = _save(tmp_path / 'c.safetensors', _clip_sd(p=8))
  out = tmp_path / 'out'
  assert convert_cli.main(['clip', '--src', src, '--out', str(out), '--image-size', '44']) == 2
  line = cli_error_line(capsys, 'convert')
  assert '44' in line and 'multiple of the patch size 8' in line, line
  assert not out.exists()


def test_image_size_resamples_a_siglip_grid_that_has_no_class_token(tmp_path):
  """docs/conversion.md#image-size: the grid is resampled bicubic, as torch's interpolate;
  SigLIP's positional embedding is the grid alone (4x4 -> 6x6 for 32 -> 48 px)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8)
  model = transformers.SiglipVisionModel(config)
  table = next(p for n, p in model.named_parameters()
               if n.endswith('embeddings.position_embedding.weight'))
  with torch.no_grad():
    table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(0)))
  model.save_pretrained(tmp_path / 'hf')
  conv = convert.load_image(str(tmp_path / 'hf'), image_size=48, log=_quiet)
  grid = table.detach().reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(6, 6), mode='bicubic', align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(36, 32).numpy()
  assert conv.model_config['image_size'] == 48
  np.testing.assert_allclose(conv.params['positional_embedding'], want, atol=1e-5)


# ----- export ------------------------------------------------------------------------------

def test_export_aim_refuses_an_image_encoder_checkpoint(tmp_path, capsys):
  """export-aim writes an AIM recognizer; what `clip` wrote is an image encoder (no backbone/
  and cls_head/): one line, no file."""
  src = _save(tmp_path / 'c.safetensors', _clip_sd())
  assert convert_cli.main(['clip', '--src', src, '--out', str(tmp_path / 'enc')]) == 0
  capsys.readouterr()
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'enc'), '--out',
                           str(tmp_path / 'm.pth')]) == 2
  assert 'not an AIM model' in cli_error_line(capsys, 'convert')
  assert not (tmp_path / 'm.pth').exists()


def test_export_aim_refuses_a_family_without_an_official_aim_format(tmp_path):
  """docs/state_dict_names.md: the official AIM recognizers are ViT_CLIP, ViT_ImageNet and
  Swin; a DINOv2 AIM model has no official file to write (although every one of its names
  would find a CLIP name)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from aim_jax.models.factory import build_model, input_shape, resolve_model_config
  cfg = resolve_model_config(dict(backbone='dinov2', width=32, layers=1, heads=2, patch_size=8,
                                  image_size=16, num_frames=2, num_classes=3))
  shapes = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                                   jnp.zeros(input_shape(cfg, 1))))['params']
  params = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
  checkpoints.save_params(str(tmp_path / 'ckpt'), params, cfg)
  with pytest.raises(ConversionError, match="'dinov2' has no official AIM format"):
    convert.export_aim(str(tmp_path / 'ckpt'), str(tmp_path / 'm.pth'), log=_quiet)
  assert not (tmp_path / 'm.pth').exists()


# ----- official names (AIM recognizers) -----------------------------------------------------

def test_a_clip_narrower_than_64_guesses_one_head(tmp_path):
  """docs/conversion.md: 'widths below 64 guess 1 head' (width/64 would be 0)."""
  conv = convert.load_clip(_save(tmp_path / 'c.safetensors', _clip_sd(d=32)), log=_quiet)
  assert conv.model_config['heads'] == 1
  assert any('heads=1 guessed' in n for n in conv.report.notices)


def test_unused_keys_of_an_aim_file_are_listed_by_their_own_names(tmp_path):
  """docs/conversion.md: every source key is mapped or listed as unused, under the name it
  has in the file (backbone.* and other top-level keys alike)."""
  sd = _golden_sd('aim_tiny_case1')
  sd['backbone.extra_buffer'] = np.zeros(3, np.float32)
  sd['data_preprocessor.mean'] = np.zeros(3, np.float32)
  conv = convert.load_aim(_save(tmp_path / 'aim.safetensors', sd), heads=4, log=_quiet)
  assert sorted(conv.report.unused) == ['backbone.extra_buffer', 'data_preprocessor.mean']
  assert {a for a, _ in conv.report.mapped} | set(conv.report.unused) == set(sd)


def test_the_aim_adapter_ratio_is_read_from_d_fc1(tmp_path):
  """docs/state_dict_names.md: the adapter ratio comes from D_fc1 ((hidden, D)): an AIM model
  exported with ratio 0.5 converts back with it."""
  from aim_jax.convert import official_names
  cfg = dict(convert.load_aim(_save(tmp_path / 'a.safetensors', _golden_sd('aim_tiny_case1')),
                              heads=4, log=_quiet).model_config)
  assert cfg['adapters']['ratio'] == 0.25
  cfg['adapters'] = dict(cfg['adapters'], ratio=0.5)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from aim_jax.models.factory import build_model, input_shape
  shapes = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                                   jnp.zeros(input_shape(cfg, 1))))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  sd = official_names.aim_params_to_state_dict(params, cfg['heads'], cfg['backbone'])
  assert sd['backbone.transformer.resblocks.0.S_Adapter.D_fc1.weight'].shape == (32, 64)
  conv = convert.load_aim(_save(tmp_path / 'b.safetensors', sd), heads=4, log=_quiet)
  assert conv.model_config['adapters']['ratio'] == 0.5


def test_act_is_refused_for_an_in21k_aim_model(tmp_path):
  """docs/conversion.md: IN-21K ViTs have one activation (exact GELU), so --act is refused for
  them rather than ignored."""
  src = _save(tmp_path / 'in21k.safetensors', _golden_sd('aim_vit_in21k_tiny_case1'))
  assert convert.load_aim(src, heads=4, act='gelu', log=_quiet).model_config['backbone'] == \
      'vit_in21k'
  with pytest.raises(ConversionError, match='quick_gelu'):
    convert.load_aim(src, heads=4, act='quick_gelu', log=_quiet)


# ----- torch_files: containers --------------------------------------------------------------

def test_a_safetensors_file_under_another_name_reads(tmp_path):
  """torch_files reads by content: a safetensors file saved as `.bin` (an 8-byte header length,
  then the JSON header) is still safetensors."""
  sd = _clip_sd()
  named = _save(tmp_path / 'a.safetensors', sd)
  (tmp_path / 'weights.bin').write_bytes(open(named, 'rb').read())
  _assert_same_params(convert.load_clip(str(tmp_path / 'weights.bin'), log=_quiet),
                      convert.load_clip(named, log=_quiet))


def test_a_safetensors_dtype_numpy_cannot_hold_is_one_line_naming_file_and_dtype(tmp_path,
                                                                                  capsys):
  """A float8 tensor (safetensors dtype F8_E4M3) is not a weight this project reads: the error
  names the file and the dtype, without a traceback."""
  header = json.dumps({'visual.conv1.weight': {'dtype': 'F8_E4M3', 'shape': [4],
                                               'data_offsets': [0, 4]}}).encode()
  path = tmp_path / 'fp8.safetensors'
  path.write_bytes(len(header).to_bytes(8, 'little') + header + bytes(4))
  assert convert_cli.main(['clip', '--src', str(path), '--out', str(tmp_path / 'o')]) == 2
  line = cli_error_line(capsys, 'convert')
  assert str(path) in line and 'F8_E4M3' in line, line



def test_a_tensor_larger_than_its_storage_is_refused_not_read_past_the_end(tmp_path):
  """torch_files: a tensor is a view (offset, size, stride) of a storage; a (damaged or
  crafted) file whose 3x3 view needs 9 elements of a 4-element storage is refused as
  truncated, never read beyond the storage's bytes."""
  import collections
  import io
  import pickle
  import zipfile

  torch = pytest.importorskip('torch')

  class Storage:
    pass

  class Tensor:
    pass

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):   # as torch.save names a storage
      return ('storage', torch.FloatStorage, '0', 'cpu', 4) if isinstance(obj, Storage) else None

    def reducer_override(self, obj):
      if isinstance(obj, Tensor):
        return (torch._utils._rebuild_tensor_v2,
                (Storage(), 0, (3, 3), (3, 1), False, collections.OrderedDict()))
      return NotImplemented

  blob = io.BytesIO()
  Pickler(blob, protocol=2).dump({'w': Tensor()})
  path = tmp_path / 'crafted.pt'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', blob.getvalue())
    z.writestr('archive/data/0', np.arange(4, dtype=np.float32).tobytes())
    z.writestr('archive/version', '3\n')
  with pytest.raises(torch_files.TruncatedCheckpointError, match='crafted.pt'):
    torch_files.load_state_dict(str(path))

# ----- output: what is never replaced -------------------------------------------------------

def test_a_dangling_symlink_out_is_refused_and_kept(tmp_path, capsys):
  """output.py: 'An existing --out is never replaced silently': a symbolic link whose target is
  gone is there, and neither a directory nor a file output replaces it."""
  src = _save(tmp_path / 'c.safetensors', _clip_sd())
  link = tmp_path / 'link'
  link.symlink_to(tmp_path / 'gone')
  assert convert_cli.main(['clip', '--src', src, '--out', str(link)]) == 2
  capsys.readouterr()
  assert convert_cli.main(['clip', '--src', src, '--out', str(tmp_path / 'enc')]) == 0
  conv = convert.load_aim(_save(tmp_path / 'aim.safetensors', _golden_sd('aim_tiny_case1')),
                          heads=4, log=_quiet)
  convert.write(conv, str(tmp_path / 'aim_ckpt'), log=_quiet)
  capsys.readouterr()
  assert convert_cli.main(['export-aim', '--src', str(tmp_path / 'aim_ckpt'), '--out',
                           str(link)]) == 2
  assert 'link' in cli_error_line(capsys, 'convert')
  assert link.is_symlink() and not (tmp_path / 'gone').exists()


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
  """docs/conversion.md: 'a conversion that fails leaves the old output as it was', also when
  the final rename of the new output over the old one fails."""
  import os

  from aim_jax.convert import output
  src = _save(tmp_path / 'c.safetensors', _clip_sd())
  src2 = _save(tmp_path / 'c2.safetensors', _clip_sd(seed=1))
  out = tmp_path / 'ckpt'
  assert convert_cli.main(['clip', '--src', src, '--out', str(out)]) == 0
  before = checkpoints.load_params(str(out))[0]['conv1']['kernel']
  real = os.rename

  def rename(a, b):
    if os.path.basename(str(a)).startswith(f'ckpt.tmp-{os.getpid()}') and str(b) == str(out):
      raise OSError(18, 'Invalid cross-device link')
    return real(a, b)

  monkeypatch.setattr(output.os, 'rename', rename)
  assert convert_cli.main(['clip', '--src', src2, '--out', str(out), '--overwrite']) == 2
  monkeypatch.undo()
  np.testing.assert_array_equal(checkpoints.load_params(str(out))[0]['conv1']['kernel'], before)
  assert sorted(os.listdir(tmp_path)) == ['c.safetensors', 'c2.safetensors', 'ckpt']


# ----- registry, source_config, cli ---------------------------------------------------------

def test_an_aim_recognizer_is_not_an_image_model(tmp_path):
  """`image` / load_image: 'any registered image-model format'; an official AIM file is the
  `aim` command's, so detection among image formats finds none."""
  src = _save(tmp_path / 'aim.safetensors', _golden_sd('aim_tiny_case1'))
  with pytest.raises(ConversionError, match='no registered image format'):
    convert.load_image(src, heads=4, log=_quiet)


def test_the_clip_command_converts_only_clip_towers(tmp_path, capsys):
  """cli: `clip` is 'OpenAI CLIP / OpenCLIP / Hugging Face CLIP image tower' (load_clip: only
  CLIP towers, whatever else matches): a timm ViT file is refused; `image` converts it."""
  src = _save(tmp_path / 'vit.safetensors', _timm_sd())
  assert convert_cli.main(['clip', '--src', src, '--out', str(tmp_path / 'a')]) == 2
  assert 'no registered image format' in cli_error_line(capsys, 'convert')
  assert not (tmp_path / 'a').exists()
  assert convert_cli.main(['image', '--src', src, '--out', str(tmp_path / 'b')]) == 0
  assert checkpoints.load_params(str(tmp_path / 'b'))[2]['format'] == 'timm_vit'


def test_formats_lists_every_documented_format(capsys):
  """docs/conversion.md names these formats; `formats` lists each, one per line, name first."""
  assert convert_cli.main(['formats']) == 0
  names = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
  assert {'aim', 'aim_swin', 'clip', 'hf_clip', 'timm_vit', 'google_vit_npz', 'siglip', 'dinov2',
          'swin'} <= names


def test_the_summary_names_every_unused_key_or_says_how_many_it_left_out():
  """The report is 'never silent': a long list may be abbreviated, but then it says how many
  entries it does not show."""
  from aim_jax.convert.registry import Report
  names = [f'text_tower_{c}.weight' for c in 'abcdefghijklmn']      # 14 distinct names
  summary = Report(unused=names).summary()
  shown = sum(n in summary for n in names)
  assert shown == len(names) or f'and {len(names) - shown} more' in summary, summary


def test_a_non_square_timm_input_size_records_no_image_size(tmp_path):
  """source_config._size: timm's input_size [C, H, W] gives a square size, or nothing; our Swin
  runs square inputs, so a 224x192 pretrained_cfg records no image_size (224 is then assumed
  and said) rather than one of its sides."""
  from aim_jax.convert import source_config
  (tmp_path / 'config.json').write_text(json.dumps({
      'architecture': 'swin_tiny_patch4_window7_224',
      'pretrained_cfg': {'input_size': [3, 224, 192]}}))
  assert 'image_size' not in source_config.recorded('swin', str(tmp_path / 'm.safetensors'))
  (tmp_path / 'config.json').write_text(json.dumps({
      'architecture': 'swin_tiny_patch4_window7_224',
      'pretrained_cfg': {'input_size': [3, 192, 192]}}))
  assert source_config.recorded('swin', str(tmp_path / 'm.safetensors'))['image_size'].value == 192


@pytest.mark.parametrize('model_type', ['clip_vision_model', 'siglip_vision_model', 'dinov2',
                                        'dinov2_with_registers'])
def test_an_absent_head_count_is_the_transformers_config_default(tmp_path, model_type):
  """docs/conversion.md: a config.json that omits num_attention_heads means the default of the
  transformers config class its model_type names (and that class's hidden_size)."""
  transformers = pytest.importorskip('transformers')
  from aim_jax.convert import source_config
  default = transformers.AutoConfig.for_model(model_type)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': model_type}))
  heads = source_config.recorded('dinov2', str(tmp_path / 'model.safetensors'))['heads']
  assert (heads.value, heads.width) == (default.num_attention_heads, default.hidden_size)


# ----- formats ------------------------------------------------------------------------------

def _hf_clip_dir(tmp_path, **config):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8,
                                      **config)
  torch.manual_seed(0)
  transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / 'hf')
  return tmp_path / 'hf'


def test_hf_clip_with_another_layer_norm_epsilon_is_refused(tmp_path):
  """formats/clip.py: the config.json is 'checked for a LayerNorm epsilon this encoder does not
  implement' (CLIP's is 1e-5)."""
  with pytest.raises(ConversionError, match='layer_norm_eps'):
    convert.load_clip(str(_hf_clip_dir(tmp_path, layer_norm_eps=1e-6)), log=_quiet)


def test_hf_clip_config_without_hidden_act_is_quick_gelu(tmp_path):
  """A config.json that leaves hidden_act out means transformers' CLIPVisionConfig default."""
  transformers = pytest.importorskip('transformers')
  hf = _hf_clip_dir(tmp_path, hidden_act='quick_gelu')
  blob = json.loads((hf / 'config.json').read_text())
  del blob['hidden_act']
  (hf / 'config.json').write_text(json.dumps(blob))
  assert transformers.CLIPVisionConfig().hidden_act == 'quick_gelu'
  assert convert.load_clip(str(hf), log=_quiet).model_config['backbone'] == 'clip'


def test_an_average_pooling_timm_vit_is_refused_by_name(tmp_path):
  """docs/state_dict_names.md#vit-in21k: timm ViTs with fc_norm (average pooling; their `norm`
  is an identity) are another family and are refused by name."""
  sd = {k: v for k, v in _timm_sd().items() if not k.startswith('norm.')}
  sd['fc_norm.weight'], sd['fc_norm.bias'] = np.ones(64, np.float32), np.zeros(64, np.float32)
  with pytest.raises(ConversionError, match='fc_norm'):
    convert.load_image(_save(tmp_path / 'avg.safetensors', sd), log=_quiet)


def test_siglip_so400m_width_guesses_16_heads():
  """docs/conversion.md: SigLIP's HF weights guess width/64 heads, except width 1152 (So400m),
  which has 16 (1152/64 would be 18)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from aim_jax.convert import registry
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=1152, intermediate_size=16, num_hidden_layers=1, num_attention_heads=16,
      image_size=16, patch_size=8))
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  _, cfg, report = registry.all_formats()['siglip'].convert(sd)
  assert cfg['heads'] == 16
  assert any('heads=16 guessed' in n for n in report.notices)


def test_a_siglip_file_without_the_map_probe_is_an_error_naming_it(tmp_path):
  """formats/siglip.py: the MAP head (probe, attention, MLP) is part of the frozen image model;
  a file that lacks its probe is a ConversionError naming head.probe (not a KeyError)."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8))
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  probe = [k for k in sd if k.endswith('head.probe')]
  assert len(probe) == 1
  del sd[probe[0]]
  with pytest.raises(ConversionError, match=r'head\.probe'):
    convert.load_image(_save(tmp_path / 'noprobe.safetensors', sd), heads=2, log=_quiet)


def test_every_key_of_a_2d_swin_is_mapped_or_unused():
  """docs/conversion.md: every source key is mapped or listed as unused; a Microsoft 2D Swin
  keeps its relative_position_index and attn_mask buffers, which are recomputed, not mapped."""
  from aim_jax.convert.formats import swin as swin_format
  sd = {k[len('backbone.'):]: v for k, v in _golden_sd('aim_swin2d_tiny_case1').items()
        if k.startswith('backbone.') and 'Adapter' not in k and 'temporal' not in k
        and 't_relative' not in k}
  assert any(k.endswith('attn_mask') for k in sd)
  assert any(k.endswith('relative_position_index') for k in sd)
  _, _, report = swin_format.image_params_from_state_dict(sd)
  assert {a for a, _ in report.mapped} | set(report.unused) == set(sd)


def test_the_swin_adapter_ratio_is_read_from_d_fc1(tmp_path):
  """docs/state_dict_names.md#swin: adapters are D_fc1 (Cs*ratio, Cs), D_fc2 (Cs, Cs*ratio); an
  AIM Swin with half-width adapters converts with ratio 0.5."""
  sd = _golden_sd('aim_swin2d_tiny_case1')
  assert convert.load_aim(_save(tmp_path / 'a.safetensors', sd),
                          log=_quiet).model_config['adapters']['ratio'] == 0.25
  rng = np.random.default_rng(0)
  wide = {}
  for k, v in sd.items():
    if '_Adapter' in k and '.D_fc' in k:
      module, tail = k.split('.D_fc')
      c = sd[module + '.D_fc2.bias'].shape[0]           # the stage width Cs
      shape = {'1.weight': (c // 2, c), '1.bias': (c // 2,), '2.weight': (c, c // 2),
               '2.bias': (c,)}[tail]
      v = rng.normal(size=shape).astype(np.float32)
    wide[k] = v
  conv = convert.load_aim(_save(tmp_path / 'b.safetensors', wide), log=_quiet)
  assert conv.model_config['adapters']['ratio'] == 0.5
