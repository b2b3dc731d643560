"""Converter inputs that are damaged or of a kind not supported: each is one line naming the
file and the key, never a traceback (found by the converter mutation audit, round 4)."""

import json

import numpy as np
import pytest
from conftest import GOLDEN, cli_error_line

from aim_jax import convert
from aim_jax.convert import cli as convert_cli
from aim_jax.convert import torch_files
from aim_jax.errors import ConversionError


def _quiet(_):
  pass


def _safetensors(path, header, data=b''):
  blob = json.dumps(header).encode()
  path.write_bytes(len(blob).to_bytes(8, 'little') + blob + data)
  return path


@pytest.mark.parametrize('entry, why', [
    (dict(dtype='F32', shape=[3, 3], data_offsets=[0, 16]), 'needs 36 bytes'),   # shape vs bytes
    (dict(dtype='F32', shape=[4]), 'data_offsets'),                                # no offsets
    (dict(dtype='F32', shape=[4], data_offsets=[0]), 'data_offsets'),             # one offset
    (dict(shape=[4], data_offsets=[0, 16]), 'dtype'),                               # no dtype
    (dict(dtype='F32', shape='four', data_offsets=[0, 16]), 'shape'),              # bad shape
])
def test_a_corrupt_safetensors_header_is_one_line_naming_file_and_tensor(tmp_path, capsys,
                                                                         entry, why):
  path = _safetensors(tmp_path / 'bad.safetensors', {'visual.conv1.weight': entry}, bytes(16))
  with pytest.raises(torch_files.CheckpointReadError) as e:
    torch_files.load_state_dict(str(path))
  assert str(path) in str(e.value) and 'visual.conv1.weight' in str(e.value)
  assert why in str(e.value), str(e.value)
  assert convert_cli.main(['clip', '--src', str(path), '--out', str(tmp_path / 'o')]) == 2
  line = cli_error_line(capsys, 'convert')
  assert str(path) in line and 'visual.conv1.weight' in line, line
  assert not (tmp_path / 'o').exists()


def test_a_safetensors_header_that_is_not_an_object_is_one_line(tmp_path):
  path = _safetensors(tmp_path / 'list.safetensors', [1, 2])
  with pytest.raises(torch_files.CheckpointReadError, match='not a JSON object'):
    torch_files.load_state_dict(str(path))


def test_a_good_safetensors_header_still_reads():
  """The checks above refuse only what disagrees: a file safetensors itself wrote reads."""
  save_file = pytest.importorskip('safetensors.numpy').save_file
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    sd = {'a': np.arange(12, dtype=np.float32).reshape(3, 4), 'b': np.zeros((0, 2), np.float16),
          'c': np.ones((2,), np.int64)}
    save_file(sd, f'{d}/ok.safetensors')
    back = torch_files.load_state_dict(f'{d}/ok.safetensors')
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_a_siglip_tower_without_its_map_head_says_so(tmp_path):
  """transformers' SiglipVisionModel(vision_use_head=False) has no head.* keys at all: the
  error says that such a tower is not supported, not which head key is missing first."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  save_file = pytest.importorskip('safetensors.numpy').save_file
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8, vision_use_head=False))
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert not any('head.' in k for k in sd)
  path = tmp_path / 'nohead.safetensors'
  save_file(sd, str(path))
  with pytest.raises(ConversionError, match=r'vision_use_head=False\) is not supported'):
    convert.load_image(str(path), heads=2, log=_quiet)


def _golden_sd(name):
  d = np.load(GOLDEN / f'{name}.npz')
  sd = {k[3:]: d[k] for k in d.files if k.startswith('sd/')}
  sd.update({k[4:]: d[k] for k in d.files if k.startswith('buf/')})
  return sd


def test_a_swin_shape_mismatch_names_the_swin_not_a_vit_width(tmp_path):
  """verify(): a tensor of the wrong shape in a Swin file is named with the Swin's embed_dim;
  the ViT default width (768) has nothing to do with it."""
  save_file = pytest.importorskip('safetensors.numpy').save_file
  sd = _golden_sd('aim_swin2d_tiny_case1')
  key = next(k for k in sd if k.endswith('layers.0.blocks.0.norm1.bias'))
  sd[key] = np.zeros(sd[key].shape[0] + 1, np.float32)
  path = tmp_path / 'swin.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  with pytest.raises(ConversionError) as e:
    convert.load_aim(str(path), log=_quiet)
  msg = str(e.value)
  assert key in msg and 'Swin, embed_dim' in msg and '768' not in msg, msg


def test_a_2d_swin_lists_its_temporal_coordinate_buffers_as_unused():
  """Every key is mapped or unused: t_relative_coords, a buffer like relative_position_index,
  is recomputed and so listed as unused, not silently dropped."""
  from aim_jax.convert.formats import swin as swin_format
  sd = {k[len('backbone.'):]: v for k, v in _golden_sd('aim_swin2d_tiny_case1').items()
        if k.startswith('backbone.') and 'Adapter' not in k and 'temporal' not in k}
  assert any(k.endswith('t_relative_coords') for k in sd)
  _, _, report = swin_format.image_params_from_state_dict(sd)
  assert {a for a, _ in report.mapped} | set(report.unused) == set(sd)
  assert any(k.endswith('t_relative_coords') for k in report.unused)
