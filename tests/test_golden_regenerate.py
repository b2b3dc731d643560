"""tests/golden/regenerate.py rebuilds the committed golden files from the official code.

Needs the official files in `.official/` (git-ignored; tests/golden/README.md says how
to fetch them), torch, einops and timm; skipped otherwise. The regeneration runs in a
subprocess (it installs import stand-ins) and writes into a temporary folder only.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

OFFICIAL = ROOT / '.official'
COMMITTED = ROOT / 'tests' / 'golden'
SCRIPT = COMMITTED / 'regenerate.py'
NEEDED = ['mmaction/models/backbones/vit_clip.py', 'mmaction/models/backbones/vit_imagenet.py',
          'mmaction/models/backbones/swin2d_adapter.py', 'mmaction/models/heads/base.py',
          'mmaction/models/heads/i3d_head.py']
CASES = sorted(p.stem for p in COMMITTED.glob('*.npz'))

needs_official = [
    pytest.mark.torch, pytest.mark.slow,
    pytest.mark.skipif(not all((OFFICIAL / f).is_file() for f in NEEDED),
                       reason='no copy of the official AIM files in .official/ '
                              '(see tests/golden/README.md)'),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                           for m in ('torch', 'einops', 'timm')),
                       reason='regenerating the goldens needs torch, einops and timm'),
]

# Computed arrays agree to ~3e-6 across CPUs (float32 reduction order); the golden tests
# compare at 1e-4 (activations) and 2e-5 (logits), so this is well inside them.
OUTPUT_ATOL = 2e-5
# What the golden tests read from config_json (besides the constructor arguments).
META_KEYS = ('heads', 'adapter_scale', 'num_frames', 'num_classes', 'num_tadapter', 'layers',
             'input_resolution', 'seed', 'official_commit')


def _script():
  spec = importlib.util.spec_from_file_location('golden_regenerate', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)         # stdlib imports only; torch loads in main()
  return module


@pytest.fixture(scope='module')
def regenerated(tmp_path_factory):
  out = tmp_path_factory.mktemp('golden')
  run = subprocess.run([sys.executable, str(SCRIPT), '--out', str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return out


def _marked(test):
  for mark in needs_official:
    test = mark(test)
  return test


@_marked
def test_every_committed_case_is_regenerated(regenerated):
  assert CASES and sorted(p.stem for p in regenerated.glob('*.npz')) == CASES


@_marked
@pytest.mark.parametrize('case', CASES)
def test_regenerated_case_matches_the_committed_file(regenerated, case):
  old, new = np.load(COMMITTED / f'{case}.npz'), np.load(regenerated / f'{case}.npz')
  assert sorted(new.files) == sorted(old.files)
  for key in old.files:
    if key == 'config_json':
      continue
    a, b = new[key], old[key]
    assert a.shape == b.shape and a.dtype == b.dtype, key
    if key.startswith(('sd/', 'buf/')) or key in ('input', 'multiview_input'):
      # Weights, buffers and inputs are seeded draws: bit-identical.
      np.testing.assert_array_equal(a, b, err_msg=key)
    else:
      np.testing.assert_allclose(a, b, atol=OUTPUT_ATOL, rtol=0, err_msg=key)
  meta_old = json.loads(str(old['config_json'][0]))
  meta_new = json.loads(str(new['config_json'][0]))
  for key in META_KEYS:
    if key in meta_old:
      assert meta_new[key] == meta_old[key], key
  _, _, given = _script().CASES[case]
  if 'constructor_args' in meta_old:
    for key in given:
      assert meta_new['constructor_args'][key] == meta_old['constructor_args'][key], key


def test_golden_dir_can_be_pointed_elsewhere(tmp_path):
  """AIM_GOLDEN_DIR makes every golden test read regenerated files (tests/conftest.py)."""
  code = 'import conftest; print(conftest.GOLDEN)'
  for env, want in ((str(tmp_path), tmp_path), ('', COMMITTED)):
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT / 'tests', text=True,
                         capture_output=True, env=dict(os.environ, AIM_GOLDEN_DIR=env))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(want)
