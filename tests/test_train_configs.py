"""Every paper row builds, passes the pre-compile checks, and trains the paper's count."""
import importlib
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from aim_jax import params as P
from aim_jax import run_config
from aim_jax.models.factory import build_model, resolve_model_config

ROWS = {
    'k400': ('b16_f8', 'b16_f16', 'b16_f32', 'l14_f8', 'l14_f16', 'l14_f32'),
    'k700': ('b16_f8', 'b16_f32', 'l14_f32'),
    'ssv2': ('b16_f8', 'b16_f16', 'b16_f32', 'l14_f8', 'l14_f16', 'l14_f32',
             'l14_f8_official_file'),
    'diving48': ('b16_f32', 'l14_f32'),
}


@pytest.mark.parametrize('name,row', [(n, r) for n, rows in ROWS.items() for r in rows])
def test_paper_row_is_consistent(name, row):
  c = importlib.import_module(f'configs.{name}').get_config(row)
  model_cfg = resolve_model_config(c.model)
  run_config.check_training_config(c, process_count=1, dp_size=8)
  assert c.batch_size == 64 and c.optimizer.lr == 3e-4 and c.optimizer.weight_decay == 0.05
  assert c.optimizer.warmup_epochs == 2.5 and c.optimizer.schedule == 'cosine_epoch'
  assert c.total_epochs == (50 if name in ('ssv2', 'diving48') else 30)
  assert model_cfg['width'] == (1024 if row.startswith('l14') else 768)
  # Only vitclip_large_k400.py and vitclip_large_sthv2.py set a backbone lr_mult.
  x01 = row.startswith('l14') and name in ('k400', 'ssv2')
  assert dict(c.optimizer.lr_mults) == ({'backbone': 0.1} if x01 else {})
  assert model_cfg['dtype'] == 'bfloat16' and model_cfg['param_dtype'] == 'float32'


@pytest.mark.parametrize('name,row,tunable,total', [
    ('k400', 'b16_f8', 10_966_672, 96_764_560),
    ('ssv2', 'b16_f8', 14_343_342, 100_141_230),
    ('diving48', 'b16_f32', 10_714_416, 96_512_304),
])
def test_paper_row_trains_the_official_parameter_count(name, row, tunable, total):
  c = importlib.import_module(f'configs.{name}').get_config(row)
  cfg = resolve_model_config(c.model)
  model = build_model(cfg)
  shape = (1, cfg['num_frames'], 224, 224, 3)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(shape))))
  params = params['params']
  mask = P.trainable_mask(params, list(c.trainable), c.full_finetune)
  assert (P.count(params, mask), P.count(params)) == (tunable, total)


def test_unknown_row_is_an_error():
  with pytest.raises(ValueError, match='k400 row'):
    importlib.import_module('configs.k400').get_config('b16_f12')


def test_trainer_and_steps_import_without_tensorflow():
  # ... and a run on synthetic clips needs none: its data module, the clips, the scalars.
  code = ('import sys, tempfile, aim_jax.train, aim_jax.steps, aim_jax.checkpoints\n'
          'from configs import k400, tiny\n'
          'k400.get_config("b16_f8")\n'
          'c = tiny.get_config()\n'
          'data = aim_jax.train.data_module(c)\n'
          'assert data.count_examples(c.data, "val") == 32\n'
          'next(data.make_train_dataset(c.data, batch_size=2, seed=0))\n'
          'next(data.make_eval_dataset(c.data, split="val", batch_size=2))\n'
          'from aim_jax.metric_writer import ScalarWriter\n'
          'ScalarWriter(tempfile.mkdtemp()).scalar("a", 1.0, 1)\n'
          'assert "tensorflow" not in sys.modules, "tensorflow imported"\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]


def test_a_misspelt_boolean_in_a_config_argument_is_an_error():
  import pytest
  from configs import common
  assert common.parse_arg('full=true,n=3', full=False, n=1).full is True
  assert common.parse_arg('full=0', full=True).full is False
  with pytest.raises(ValueError, match=r"full='ture' is not a boolean"):
    common.parse_arg('full=ture', full=False)


def test_the_clip_length_classes_and_size_have_one_owner():
  # data.* are references to model.*: setting either sets both; they can never disagree.
  from configs import k400
  c = k400.get_config('b16_f8')
  c.unlock()
  c.data.num_frames = 16
  assert c.model.num_frames == 16
  c.model.num_classes = 7
  assert c.data.num_classes == 7
  assert c.to_dict()['data']['image_size'] == c.model.image_size


def test_variant_and_an_explicit_width_that_contradicts_it_is_an_error():
  import pytest
  from aim_jax.models.factory import resolve_model_config
  assert resolve_model_config(dict(variant='B/16', width=768))['layers'] == 12   # agrees
  with pytest.raises(ValueError, match=r"model.variant 'B/16' means model.width=768"):
    resolve_model_config(dict(variant='B/16', width=512))
