"""Test setup: CPU only, one device in-process (multi-device tests use subprocesses)."""
import os
import pathlib
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'golden'
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
