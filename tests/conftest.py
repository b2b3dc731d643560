"""Test setup: CPU only, 8 CPU devices in-process, so mesh tests need no subprocess.

Subprocesses (signals, multi-process runs, command lines) get the environment of
`cpu_env(devices)` and choose their own device count.
"""
import atexit
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# `import tensorflow` imports keras eagerly (and with it scikit-learn and matplotlib): ~1.5-2 s
# of the ~6 s each test process spends importing TF. Nothing here uses tf.keras; in legacy mode
# without tf_keras installed, TF skips that import (a tf.keras access would fail instead).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
# Before jax is imported anywhere: the in-process tests see 8 CPU devices.
_HOST_DEVICES = '--xla_force_host_platform_device_count=8'
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  _flags = (_flags + ' ' + _HOST_DEVICES).strip()
# The tests' programs are tiny and mostly run a few times: LLVM's optimisation of the CPU
# code takes longer than running it. Level 0 cut test_swin.py from 85 s to 54 s here, with
# the same results (the same XLA graph; only the machine code is less tuned). Subprocesses
# inherit it; `cpu_env(optimized=True)` restores the default for runs that take many steps.
# Likewise XLA's newer CPU fusion emitters (MLIR) compile a fusion more slowly than the
# older ones; the older ones cut the compilation-bound test_attention_impl.py +
# test_model.py from ~120 to ~75 CPU-s here, with the same results. For runs of many steps
# (`optimized=True`) the default is kept: its machine code runs faster (the CI demo's image
# pre-training: 47 s with it, 62 s without).
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')


def known_to_xla(flags: list[str]) -> list[str]:
  """Those of `flags` that this jaxlib's XLA accepts, in order. XLA aborts a process whose
  XLA_FLAGS holds a flag it does not know, and flags come and go between XLA versions
  (jaxlib 0.11 no longer has --xla_cpu_use_fusion_emitters), so a subprocess starts JAX's
  CPU backend with them first and each flag it reports unknown is dropped."""
  kept = list(flags)
  for _ in range(len(flags)):
    probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices("cpu")'],
                           env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(kept)),
                           capture_output=True, text=True, timeout=300, check=False)
    unknown = re.search(r'Unknown flags? in XLA_FLAGS: ([^\n]*)', probe.stderr)
    if probe.returncode == 0 or not unknown:
      return kept          # accepted, or a failure of another kind for the tests to show
    names = {f.split('=')[0] for f in unknown.group(1).split()}
    kept = [f for f in kept if f.split('=')[0] not in names]
  return kept


# The fast-compile flags this XLA knows, found once by the first process that loads this
# file (pytest, or xdist's controller); its workers and subprocesses inherit XLA_FLAGS.
_wanted = [f for f in _FAST_COMPILE if f.split('=')[0] not in _flags]   # set one to override
if _wanted and not os.environ.get('AIM_TESTS_XLA_FLAGS_CHECKED'):
  _flags = ' '.join(known_to_xla(_flags.split() + _wanted))
  os.environ['AIM_TESTS_XLA_FLAGS_CHECKED'] = '1'
os.environ['XLA_FLAGS'] = _flags.strip()

# One XLA compilation cache for the whole test run, shared by the in-process tests and
# every subprocess they start: the same tiny programs (train step, eval step, init) are
# compiled by dozens of tests. A hit loads the executable XLA built before for the same
# program, flags and devices, so results are unchanged. The process that loads this file
# first (pytest itself, or pytest-xdist's controller, whose workers inherit the variable)
# makes a fresh directory and removes it at exit; a directory already set is used as is.
# The same directory is the TMPDIR of the processes the run starts: the temporary files a
# process killed on purpose leaves behind (TensorFlow's autograph modules, removed at a
# normal exit) go with it, not into the system's temporary directory. This process keeps
# the system's own (pytest's tmp_path and its retained failures live there).
if 'AIM_TESTS_TMP' not in os.environ:
  tempfile.gettempdir()                     # cached here before TMPDIR changes
  os.environ['AIM_TESTS_TMP'] = tempfile.mkdtemp(prefix='aim-jax-tests-')
  atexit.register(shutil.rmtree, os.environ['AIM_TESTS_TMP'], ignore_errors=True)
  os.environ['TMPDIR'] = os.environ['AIM_TESTS_TMP']
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                        os.path.join(os.environ['AIM_TESTS_TMP'], 'xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# AIM_GOLDEN_DIR: run the golden tests on regenerated files (tests/golden/regenerate.py).
GOLDEN = pathlib.Path(os.environ.get('AIM_GOLDEN_DIR') or ROOT / 'tests' / 'golden')
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def cli_error_line(capsys, prog: str) -> str:
  """The one line a command's user error prints, `PROG: ErrorType: message`, with no
  traceback (from `capsys`, for commands run in-process)."""
  err = capsys.readouterr().err
  assert 'Traceback' not in err, err
  lines = [line for line in err.splitlines() if line.startswith(f'{prog}: ')]
  assert len(lines) == 1, err
  return lines[0]


def cpu_env(devices: int = 1, *, optimized: bool = False, **extra: str) -> dict:
  """The environment of a subprocess that runs on `devices` CPU devices; `optimized`: with
  XLA's default code optimisation (for runs of hundreds of steps), not the tests' level 0."""
  drop = ['xla_force_host_platform_device_count'] + (list(_FAST_COMPILE) if optimized else [])
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                   if not any(d in f for d in drop))
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
              XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
              **extra)


def pytest_collection_modifyitems(config, items):
  """Modules with a slow test first: with `make test`'s two workers, a long module started
  last would leave one worker idle at the end."""
  slow = {item.module.__name__ for item in items if item.get_closest_marker('slow')}
  demo_first = ('test_demo',)
  items.sort(key=lambda item: (item.module.__name__.split('.')[-1] not in demo_first,
                               item.module.__name__ not in slow))
