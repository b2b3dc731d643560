"""Test setup: CPU only, 8 CPU devices in-process, so mesh tests need no subprocess.

Subprocesses (signals, multi-process runs, command lines) get the environment of
`cpu_env(devices)` and choose their own device count.
"""
import os
import pathlib
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Before jax is imported anywhere: the in-process tests see 8 CPU devices.
_HOST_DEVICES = '--xla_force_host_platform_device_count=8'
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' ' + _HOST_DEVICES).strip()

ROOT = pathlib.Path(__file__).resolve().parents[1]
# AIM_GOLDEN_DIR: run the golden tests on regenerated files (tests/golden/regenerate.py).
GOLDEN = pathlib.Path(os.environ.get('AIM_GOLDEN_DIR') or ROOT / 'tests' / 'golden')
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def cpu_env(devices: int = 1, **extra: str) -> dict:
  """The environment of a subprocess that runs on `devices` CPU devices."""
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                   if 'xla_force_host_platform_device_count' not in f)
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
              XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
              **extra)
