"""Start `python -m aim_jax.train` (or `aim_jax.evaluate`) on one machine, a GPU
cluster or a Cloud TPU VM slice, with JAX's own multi-host runtime.

Every launcher here does the same three things: validate its arguments (the
config loads as the job will load it, every --config.FIELD=VALUE it overrides
names a field and parses to its type, and the result passes the job's own
first checks: model, data, optimizer and, where the launcher knows the job's
devices and processes, the mesh, batch sizes and the rest of the training
config; the workdir is a local path or gs://; slice and node counts are
possible) before anything starts; build one bash script whose last step is the
same `python -m aim_jax.train --config C --workdir W [--config.X=Y ...]` line;
then print that script (`--dry-run`) or run it with bash. What is printed is exactly
what runs, so a dry run can be saved and replayed.

  launch/local.sh CONFIG WORKDIR [--processes N --cpu-devices K]   one machine
  launch/multinode.sh --coordinator H:P --num-processes N --process-id I CONFIG WORKDIR
  launch/slurm_submit.sh --nodes N --gpus-per-node G CONFIG WORKDIR   (-> slurm.sbatch)
  launch/tpu_pod.sh train|evaluate|logs|stop|delete --name TPU --zone Z ...
  python launch/launch.py check-config CONFIG [--num-devices N --num-processes P]
      [--job evaluate] [--config.X=Y ...]   load and check it, nothing else

Processes find each other through `aim_jax.distributed.maybe_initialize()`:
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (local, plain
multi-node), SLURM's variables (slurm.sbatch) or Cloud TPU metadata
(AIM_JAX_DISTRIBUTED=auto on TPU VMs). No process manager of our own beyond
starting the simulated local processes and waiting for them.

The launcher itself is standard library only. Loading and checking a config
imports aim_jax and what it needs (jax, flax, ml_collections): with the job's
interpreter (`--python`) for local, multi-node and SLURM jobs; for TPU slices
with this interpreter, or, on a laptop that has gcloud but no jax, on every
worker right before the job starts. --no-config-check skips both.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {'train': 'aim_jax.train', 'evaluate': 'aim_jax.evaluate'}
# SLURM --cpus-per-task default: cores per GPU for tf.data video decoding and
# augmentation (one process per GPU gets 8, one per node 8 x its GPUs). Nodes with
# 8 GPUs have 64 to 224 cores; raise it with --cpus-per-task where yours has more.
CPUS_PER_GPU = 8
# Names on TPU workers (relative to $HOME): the copied source, its venv, logs.
REMOTE_SRC = 'aim-jax'
REMOTE_VENV = 'aim-jax-venv'
REMOTE_LOGS = 'aim-jax-logs'
SOURCE_TARBALL = 'aim-jax-src.tar.gz'


class LaunchError(ValueError):
  """A launcher argument that cannot work; the message names it and says why."""


# ----------------------------------------------------------------------------
# Argument validation.
# ----------------------------------------------------------------------------


def split_config(spec: str) -> tuple[str, str | None]:
  """'configs/k400.py:b16_f8' -> ('configs/k400.py', 'b16_f8'); the arg is optional."""
  path, sep, arg = spec.partition('.py:')
  if sep:
    return path + '.py', arg
  return spec, None


def validate_config(spec: str, *, cwd: Path | None = None, root: Path = ROOT) -> str:
  """Checks that the config file of `spec` exists; returns the spec to pass on.

  A relative path is looked up from `cwd`, then from the repository root; it is
  returned relative to the root when it lies inside it (commands run from the
  root, also on TPU workers where the tree is copied), absolute otherwise.
  """
  if not spec:
    raise LaunchError('config: empty; expected configs/NAME.py[:ARG]')
  path, arg = split_config(spec)
  if not path.endswith('.py'):
    raise LaunchError(f'config {spec!r}: not a Python config file; expected configs/NAME.py[:ARG]')
  if arg == '':
    raise LaunchError(f'config {spec!r}: empty argument after ":"; drop the ":" or name a row')
  cwd = Path.cwd() if cwd is None else cwd
  candidates = [Path(path)] if Path(path).is_absolute() else [cwd / path, root / path]
  found = next((c.resolve() for c in candidates if c.is_file()), None)
  if found is None:
    raise LaunchError(f'config {spec!r}: file {path} does not exist (looked in '
                      + ', '.join(str(c.parent) for c in candidates) + ')')
  try:
    shown = str(found.relative_to(root.resolve()))
  except ValueError:
    shown = str(found)
  return shown + (f':{arg}' if arg is not None else '')


class ConfigUnavailable(LaunchError):
  """This interpreter cannot import what the config needs (jax, ml_collections, ...)."""


def config_args(args: Sequence[str]) -> list[str]:
  """The --config.FIELD[=VALUE] arguments of the job's `args`, each --config.FIELD without
  `=` with the argument after it (unless that is a flag): absl reads `--config.FIELD V`
  as FIELD=V, or V as a positional argument where FIELD is a boolean."""
  out, args = [], list(args)
  for i, a in enumerate(args):
    if a.startswith('--config.'):
      out.append(a)
      if '=' not in a and i + 1 < len(args) and not args[i + 1].startswith('--'):
        out.append(args[i + 1])
  return out


def load_config_here(spec: str, overrides: Sequence[str] = (), root: Path = ROOT):
  """Loads `spec` as the job will, with its overrides applied; raises LaunchError.

  Like ml_collections' config flag: import the file as a module (the repository
  root on sys.path, as `python -m aim_jax.train` run from it has), then call
  get_config(ARG), or get_config() without an argument. Every --config.FIELD of
  `overrides` must name a field of the result; its value is parsed to the field's
  type and set by ml_collections' own flag parser, as the job's will.
  """
  import importlib.machinery
  import importlib.util
  path, arg = split_config(spec)
  file = Path(path) if Path(path).is_absolute() else root / path
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  try:
    loader = importlib.machinery.SourceFileLoader('aim_launch_config', str(file))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    config = module.get_config() if arg is None else module.get_config(arg)
  except ModuleNotFoundError as e:
    raise _missing_module(spec, e, root) from None
  except Exception as e:  # noqa: BLE001 (whatever get_config raises is the config's error)
    raise LaunchError(f'config {spec!r}: {_one_line(e)}') from None
  args = config_args(overrides)
  if not args:
    return config
  try:
    from absl import flags
    from ml_collections.config_flags import config_flags, config_path
  except ModuleNotFoundError as e:
    raise _missing_module(spec, e, root) from None
  for a in args:
    if a.startswith('--config.'):
      _check_field(spec, config, a, config_path)
  original = copy.deepcopy(config)
  try:
    return _parse_overrides(config, args, flags, config_flags)
  except Exception as e:  # noqa: BLE001 (what the job's flag parser would refuse)
    raise LaunchError(_override_error(spec, original, args, e, flags, config_flags,
                                      config_path)) from None


def _missing_module(spec: str, e: ModuleNotFoundError, root: Path) -> LaunchError:
  top = (e.name or '').split('.')[0]
  if top and not (root / top).exists() and not (root / f'{top}.py').exists():
    return ConfigUnavailable(f'config {spec!r}: cannot be loaded by {sys.executable} '
                             f'(no module {e.name!r}): install aim-jax there, or pass '
                             '--no-config-check')
  return LaunchError(f'config {spec!r}: {_one_line(e)}')


def _parse_overrides(config, args: list[str], flags, config_flags):
  """`config` with `args` applied by ml_collections' config flag (a FlagValues of its own)."""
  argv = ['launch', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', config, flag_values=values, sys_argv=argv)
  values(argv)
  return values['config'].value


def _override_error(spec: str, config, args: list[str], error: Exception, flags, config_flags,
                    config_path) -> str:
  """One line naming the override that the job's flag parser refuses, and why."""
  text = ' '.join(str(error).split())
  if isinstance(error, flags.IllegalFlagValueError) and text.startswith('flag --config.'):
    # 'flag --config.F=V: why': say which type F has.
    flag, _, why = text[len('flag '):].partition(': ')
    field = flag[len('--config.'):].partition('=')[0]
    try:
      kind = config_path.get_type(field, config).__name__
    except Exception:  # noqa: BLE001 (only for the message)
      return f'{flag}: {why}'
    return f'{flag}: not a valid {kind} for field {field} of config {spec!r} ({why})'
  # Otherwise: the first override that fails alone, else all of them.
  for i, a in enumerate(args):
    if not a.startswith('--config.'):
      continue
    alone = [a] + ([args[i + 1]] if i + 1 < len(args) and not args[i + 1].startswith('--')
                   else [])
    try:
      _parse_overrides(copy.deepcopy(config), alone, flags, config_flags)
    except Exception as e:  # noqa: BLE001
      return f'{a}: {_one_line(e)}'
  return f'config {spec!r} with {" ".join(args)}: {_one_line(error)}'


def _one_line(e: BaseException) -> str:
  text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
  return f'{type(e).__name__}: ' + ' '.join(str(text).split())


def _check_field(spec: str, config, override: str, config_path) -> None:
  """--config.a.b=V must name an existing field a.b (as the job's flag parser requires)."""
  field = override[len('--config.'):].partition('=')[0]
  try:
    config_path.get_value(field, config)
  except (AttributeError, KeyError, IndexError, ValueError):
    raise LaunchError(f'--config.{field}: config {spec!r} has no field {field!r}') from None


@dataclasses.dataclass(frozen=True)
class JobShape:
  """The devices and processes a job runs on, where the launcher knows them."""
  devices: int
  processes: int

  def __str__(self) -> str:
    return (f'{self.devices} device{"s" * (self.devices != 1)}, '
            f'{self.processes} process{"es" * (self.processes != 1)}')


def check_run_config(spec: str, config, job: str = 'train', shape: JobShape | None = None,
                     root: Path = ROOT) -> None:
  """The job's own first checks of its config: a LaunchError naming the field.

  Every job: the model resolves (aim_jax.run_config.resolve_model), the data and
  optimizer fields are in range (data_pipelines.config.check, check_optimizer).
  Training on a known `shape`: the mesh fits its devices (aim_jax.sharding.mesh_shape)
  and check_training_config holds for its process count and data-parallel size,
  except that compiler_options are parsed, not compiled: compiling would start this
  machine's accelerator in the launcher, which outlives the job's start.
  """
  try:
    from aim_jax import run_config
    from aim_jax.errors import ConfigError
    from data_pipelines import config as data_config
    if job == 'train' and shape is not None:
      from aim_jax import sharding
  except ModuleNotFoundError as e:
    raise _missing_module(spec, e, root) from None
  where = f' on {shape}' if job == 'train' and shape is not None else ''
  try:
    run_config.check_config_type(config, spec)
    run_config.resolve_model(config.model)
    data_config.check(config.data)
    run_config.check_optimizer(config.optimizer)
    if job == 'train' and shape is not None:
      data, fsdp, _ = sharding.mesh_shape(config.mesh, shape.devices)
      run_config.check_training_config(config, shape.processes, data * fsdp,
                                       compile_options=False)
  except ConfigError as e:
    raise LaunchError(f'config {spec!r}{where}: ' + ' '.join(str(e).split())) from None
  except Exception as e:  # noqa: BLE001 (a check that trips over a value: still the config's)
    raise LaunchError(f'config {spec!r}{where}: {_one_line(e)}') from None


def check_config_loads(args: argparse.Namespace, config: str, overrides: Sequence[str],
                       python: str | None, shape: JobShape | None = None) -> None:
  """Loads and checks the config before anything starts, with the job's interpreter.

  The current interpreter does it in-process (load_config_here, check_run_config);
  another one (`--python`) runs `launch.py check-config` from the repository root.
  `shape`: the job's devices and processes, where known. --no-config-check skips it.
  """
  if getattr(args, 'no_config_check', False):
    return
  job = getattr(args, 'job', 'train')
  if python is None or _same_interpreter(python):
    check_run_config(config, load_config_here(config, overrides), job, shape)
    return
  argv = [python, str(ROOT / 'launch' / 'launch.py'), *check_config_argv(config, overrides,
                                                                         job, shape)]
  try:
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise LaunchError(f'--python {python}: cannot run it here to load config {config!r} '
                      f'({_one_line(e)}); pass --no-config-check to skip the check') from None
  if out.returncode:
    errors = [ln[len('launch: error: '):] for ln in out.stderr.splitlines()
              if ln.startswith('launch: error: ')]
    raise LaunchError(errors[-1] if errors else
                      f'--python {python}: loading config {config!r} failed (exit '
                      f'{out.returncode}): ' + ' '.join(out.stderr.split()[-40:]))


def check_config_argv(config: str, overrides: Sequence[str], job: str,
                      shape: JobShape | None) -> list[str]:
  """`check-config` arguments that check what the job will get (after `launch.py`)."""
  argv = ['check-config', config, '--job', job]
  if shape is not None:
    argv += ['--num-devices', str(shape.devices), '--num-processes', str(shape.processes)]
  return argv + config_args(overrides)


def _same_interpreter(python: str) -> bool:
  found = shutil.which(python) or python
  return os.path.abspath(found) == os.path.abspath(sys.executable)


_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')
_BUCKET = re.compile(r'^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$')


def validate_dir(path: str, *, what: str = 'workdir', require_gcs: bool = False,
                 must_exist: bool = False, cwd: Path | None = None) -> str:
  """A local path (made absolute) or gs://BUCKET/PATH; any other scheme is an error.

  tf.io.gfile and orbax read and write both; other schemes (s3://, gcs://, ...)
  are not tested here and fail late, so they are refused early.
  """
  if not path:
    raise LaunchError(f'{what}: empty')
  m = _SCHEME.match(path)
  if m:
    if m.group(1) != 'gs':
      raise LaunchError(f'{what} {path!r}: scheme {m.group(1)}:// is not supported; '
                        'use a local path or gs://BUCKET/PATH')
    bucket = path[len('gs://'):].split('/', 1)[0]
    if not _BUCKET.match(bucket):
      raise LaunchError(f'{what} {path!r}: {bucket!r} is not a valid bucket name')
    return path.rstrip('/')
  if require_gcs:
    raise LaunchError(f'{what} {path!r}: must be gs://BUCKET/PATH here, since every TPU '
                      'worker reads and writes it and local disks go away with the VM')
  local = Path(path).expanduser()
  if not local.is_absolute():
    local = (Path.cwd() if cwd is None else cwd) / local
  if must_exist and not local.exists():
    raise LaunchError(f'{what} {path!r}: {local} does not exist')
  return str(local)


def validate_overrides(extra: Sequence[str]) -> list[str]:
  """Arguments not known to the launcher: only --config.FIELD[=VALUE] pass through.

  Anything else after a literal `--` is handed to the entry point unchecked.
  """
  if '--' in extra:
    i = list(extra).index('--')
    head, tail = list(extra[:i]), list(extra[i + 1:])
  else:
    head, tail = list(extra), []
  for a in head:
    if not a.startswith('--config.'):
      raise LaunchError(f'unknown argument {a!r}: overrides look like --config.FIELD=VALUE; '
                        'put other flags of the entry point after --')
  return head + tail


def validate_env(pairs: Sequence[str]) -> list[tuple[str, str]]:
  out = []
  for p in pairs:
    key, eq, value = p.partition('=')
    if not eq or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', key):
      raise LaunchError(f'--env {p!r}: expected NAME=VALUE')
    out.append((key, value))
  return out


def positive(name: str, value: int) -> int:
  if value < 1:
    raise LaunchError(f'{name} must be >= 1, got {value}')
  return value


def validate_coordinator(address: str) -> str:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise LaunchError(f'--coordinator {address!r}: expected HOST:PORT with a port in 1..65535')
  return address


# ----------------------------------------------------------------------------
# Cloud TPU slices.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """What an accelerator type such as v4-32 means (Cloud TPU docs, per generation)."""
  accelerator: str
  generation: str
  chips: int
  devices: int  # JAX devices: TensorCores on v2/v3, chips elsewhere (megacore/one core)
  hosts: int  # TPU VM workers, one JAX process each
  runtime: str  # default --version for `gcloud compute tpus tpu-vm create`


# Size N in the name counts TensorCores for v2/v3/v4/v5p and chips for v5e/v6e.
_TPU_GENERATIONS = {
    'v2': dict(runtime='tpu-ubuntu2204-base', sizes={8, 32, 128, 256, 512}),
    'v3': dict(runtime='tpu-ubuntu2204-base', sizes={8, 32, 64, 128, 256, 512, 1024, 2048}),
    'v4': dict(runtime='tpu-ubuntu2204-base', max_cores=8192),
    'v5p': dict(runtime='v2-alpha-tpuv5', max_cores=12288),
    'v5litepod': dict(runtime='v2-alpha-tpuv5-lite', sizes={1, 4, 8, 16, 32, 64, 128, 256}),
    'v6e': dict(runtime='v2-alpha-tpuv6e', sizes={1, 4, 8, 16, 32, 64, 128, 256}),
}


def parse_accelerator(name: str) -> TpuSlice:
  """'v4-32' -> 16 chips, 16 devices, 4 hosts. Errors say which sizes exist.

  Checked against the documented pattern of each generation; gcloud has the
  last word on which topologies a zone offers.
  """
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', name or '')
  if not m:
    raise LaunchError(f'--accelerator {name!r}: expected GENERATION-SIZE such as v4-32, '
                      'v5litepod-16, v5p-8 or v6e-8')
  gen, n = m.group(1), int(m.group(2))
  if gen == 'v5e':
    raise LaunchError(f'--accelerator {name!r}: Cloud TPU calls v5e "v5litepod": '
                      f'use v5litepod-{n}')
  if gen not in _TPU_GENERATIONS:
    raise LaunchError(f'--accelerator {name!r}: unknown TPU generation {gen!r}; known: '
                      + ', '.join(_TPU_GENERATIONS))
  spec = _TPU_GENERATIONS[gen]
  if 'sizes' in spec and n not in spec['sizes']:
    raise LaunchError(f'--accelerator {name!r}: {gen} slices come in sizes '
                      + ', '.join(str(s) for s in sorted(spec['sizes'])))
  if 'max_cores' in spec and (n % 8 or not 8 <= n <= spec['max_cores']):
    raise LaunchError(f'--accelerator {name!r}: {gen}-N counts TensorCores (2 per chip, '
                      f'4 chips per host): N must be a multiple of 8 in 8..{spec["max_cores"]}')
  if gen in ('v2', 'v3'):
    chips, devices, hosts = n // 2, n, n // 8
  elif gen in ('v4', 'v5p'):
    chips = n // 2
    devices, hosts = chips, max(1, chips // 4)
  else:  # v5e/v6e: one VM with up to 8 chips, multi-host slices have 4 chips per VM
    chips = devices = n
    hosts = 1 if n <= 8 else n // 4
  return TpuSlice(name, gen, chips, devices, hosts, spec['runtime'])


# ----------------------------------------------------------------------------
# Plans: the bash script a launcher runs.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  """A bash script: `# notes`, then steps. Printed by --dry-run, else run by bash."""
  notes: list[str]
  steps: list[str]
  cwd: Path = ROOT

  def script(self) -> str:
    lines = ['#!/usr/bin/env bash', 'set -euo pipefail']
    lines += [f'# {n}' for n in self.notes]
    lines += [f'cd {shlex.quote(str(self.cwd))}'] + self.steps
    return '\n'.join(lines) + '\n'

  def run(self) -> int:
    return subprocess.call(['bash', '-c', self.script()])


def entry_argv(job: str, python: str, config: str, directory: str,
               overrides: Sequence[str]) -> list[str]:
  """The one line every launcher ends in."""
  dir_flag = '--workdir' if job == 'train' else '--checkpoint'
  return [python, '-m', ENTRIES[job], '--config', config, dir_flag, directory, *overrides]


def _exports(env: Sequence[tuple[str, str]]) -> list[str]:
  return [f'export {k}={shlex.quote(v)}' for k, v in env]


def _assignments(env: Sequence[tuple[str, str]]) -> str:
  return ' '.join(f'{k}={shlex.quote(v)}' for k, v in env)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def local_plan(args: argparse.Namespace, overrides: list[str]) -> Plan:
  """All local devices in one process, or N simulated processes on CPU."""
  processes = positive('--processes', args.processes)
  if args.cpu_devices is not None:
    positive('--cpu-devices', args.cpu_devices)
  if processes > 1 and args.cpu_devices is None:
    raise LaunchError(f'--processes {processes}: several processes on one machine are a CPU '
                      'simulation of a multi-host job; add --cpu-devices K (devices per process)')
  config = validate_config(args.config)
  env = validate_env(args.env)
  if args.cpu_devices is not None:
    shape = JobShape(processes * args.cpu_devices, processes)
  else:
    gpus = local_gpu_count(args.python, dict(os.environ, **dict(env)))
    shape = JobShape(gpus, 1) if gpus else None
  check_config_loads(args, config, overrides, args.python, shape)
  directory = _job_dir(args)
  if args.cpu_devices is not None:
    env = [('JAX_PLATFORMS', 'cpu')] + env
  argv = entry_argv(args.job, args.python, config, directory, overrides)
  steps = _exports(env)
  if args.cpu_devices is not None:
    # Added to the user's XLA_FLAGS at run time rather than replacing them.
    steps.append('export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count='
                 f'{args.cpu_devices}"')
  if processes == 1:
    notes = [f'{args.job} on every local device ({_devices_note(args.cpu_devices)})']
    return Plan(notes, steps + ['exec ' + shlex.join(argv)])
  port = args.port or free_port()
  notes = [f'{args.job}: {processes} processes x {args.cpu_devices} CPU devices, '
           f'coordinator 127.0.0.1:{port}']
  steps += [f'export JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} JAX_NUM_PROCESSES={processes}',
            'pids=()']
  for i in range(processes):
    steps.append(f'JAX_PROCESS_ID={i} {shlex.join(argv)} &')
    steps.append('pids+=($!)')
  steps += [
      # Background jobs ignore Ctrl-C: forward it (and TERM) to them as SIGTERM, on
      # which training checkpoints. Set after the forks so that no child inherits it.
      "trap 'kill -TERM \"${pids[@]}\" 2>/dev/null || true' INT TERM",
      # A failed process would leave the others waiting on it: stop them all. Each is
      # waited for by its pid once it has ended: a loop of `wait -n` reads two processes
      # that end together as a failure (~1 in 300 here: bash reaps both at once and the
      # second `wait -n` finds no child left, exit 127).
      'status=0',
      'while [ ${#pids[@]} -gt 0 ]; do',
      '  for i in "${!pids[@]}"; do',
      '    if ! kill -0 "${pids[$i]}" 2>/dev/null; then',
      '      wait "${pids[$i]}" || { status=1; kill -TERM "${pids[@]}" 2>/dev/null || true; }',
      '      unset "pids[$i]"',
      '    fi',
      '  done',
      '  if [ ${#pids[@]} -gt 0 ]; then sleep 0.2; fi',
      'done',
      'exit $status']
  return Plan(notes, steps)


CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_cuda12_pjrt', 'jax_cuda13_pjrt')


def local_gpu_count(python: str, env: dict[str, str]) -> int | None:
  """The GPUs a one-process local job gets, where that is cheap to tell; else None.

  Only for this interpreter with jax's CUDA plugin installed, JAX_PLATFORMS unset or
  cuda, and `nvidia-smi -L` listing whole GPUs (no MIG), narrowed by
  CUDA_VISIBLE_DEVICES: the count of JAX's devices in the job.
  """
  import importlib.util
  platforms = env.get('JAX_PLATFORMS', '')
  if platforms and platforms.split(',')[0] not in ('cuda', 'gpu'):
    return None
  if not _same_interpreter(python) or not shutil.which('nvidia-smi'):
    return None
  if not any(importlib.util.find_spec(name) for name in CUDA_PLUGINS):
    return None
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = out.stdout.splitlines()
  if out.returncode or any(ln.strip().startswith('MIG') for ln in lines):
    return None
  count = sum(ln.startswith('GPU ') for ln in lines)
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    count = min(count, len([v for v in visible.split(',') if v.strip()]))
  return count or None


def _devices_note(cpu_devices: int | None) -> str:
  return f'{cpu_devices} simulated CPU devices' if cpu_devices else 'GPU/TPU if present, else CPU'


def _job_dir(args: argparse.Namespace, require_gcs: bool = False) -> str:
  what = 'workdir' if args.job == 'train' else 'checkpoint'
  return validate_dir(args.dir, what=what, require_gcs=require_gcs,
                      must_exist=args.job == 'evaluate')


def multinode_plan(args: argparse.Namespace, overrides: list[str]) -> Plan:
  """One process of a multi-node job; run the same command on every node."""
  n = positive('--num-processes', args.num_processes)
  if not 0 <= args.process_id < n:
    raise LaunchError(f'--process-id {args.process_id}: must be in 0..{n - 1} '
                      f'for --num-processes {n}')
  coordinator = validate_coordinator(args.coordinator)
  env = [('JAX_COORDINATOR_ADDRESS', coordinator), ('JAX_NUM_PROCESSES', str(n)),
         ('JAX_PROCESS_ID', str(args.process_id))]
  shape = None   # devices per process: all the node's, unknown here, unless listed
  if args.local_device_ids:
    if not re.fullmatch(r'\d+(,\d+)*', args.local_device_ids):
      raise LaunchError(f'--local-device-ids {args.local_device_ids!r}: expected e.g. 0,1,2,3')
    env.append(('JAX_LOCAL_DEVICE_IDS', args.local_device_ids))
    shape = JobShape(n * len(args.local_device_ids.split(',')), n)
  env += validate_env(args.env)
  config = validate_config(args.config)
  check_config_loads(args, config, overrides, args.python, shape)
  directory = _job_dir(args)
  notes = [f'process {args.process_id} of {n}; coordinator {coordinator} (process 0 serves it)']
  if not directory.startswith('gs://') and n > 1:
    notes.append(f'{directory} must be on a file system every node shares')
  argv = entry_argv(args.job, args.python, config, directory, overrides)
  return Plan(notes, _exports(env) + ['exec ' + shlex.join(argv)])


def slurm_plan(args: argparse.Namespace, overrides: list[str]) -> Plan:
  """`sbatch launch/slurm.sbatch PYTHON -m aim_jax.train ...` with the job's shape."""
  nodes = positive('--nodes', args.nodes)
  gpus = positive('--gpus-per-node', args.gpus_per_node)
  if args.time is not None:
    validate_slurm_time(args.time)
  # slurm.sbatch: srun starts --ntasks-per-node tasks on each node, each one JAX process.
  tasks = gpus if args.process_per == 'gpu' else 1
  config = validate_config(args.config)
  check_config_loads(args, config, overrides, args.python, JobShape(nodes * gpus, nodes * tasks))
  directory = _job_dir(args)
  cpus = args.cpus_per_task
  cpus = CPUS_PER_GPU * (gpus // tasks) if cpus is None else positive('--cpus-per-task', cpus)
  sbatch = ['sbatch', f'--job-name={args.job_name}', f'--nodes={nodes}',
            f'--ntasks-per-node={tasks}', f'--gpus-per-node={gpus}', f'--chdir={ROOT}',
            f'--export=ALL,AIM_SLURM_PROCESS_PER={args.process_per}']
  for flag in ('partition', 'account', 'time', 'cpus_per_task', 'output'):
    value = cpus if flag == 'cpus_per_task' else getattr(args, flag)
    if value is not None:
      sbatch.append(f'--{flag.replace("_", "-")}={value}')
  sbatch += list(args.sbatch_arg)
  argv = entry_argv(args.job, args.python, config, directory, overrides)
  notes = [f'{nodes} node(s) x {gpus} GPU(s), one process per {args.process_per}: '
           f'{nodes * tasks} JAX process(es), {nodes * gpus} devices, '
           f'{cpus} CPU core(s) per process']
  if not directory.startswith('gs://') and nodes > 1:
    notes.append(f'{directory} must be on a file system every node shares')
  env = validate_env(args.env)
  steps = _exports(env) + [shlex.join(sbatch + [str(ROOT / 'launch' / 'slurm.sbatch')] + argv)]
  return Plan(notes, steps)


_SLURM_TIME = re.compile(r'\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}')


def validate_slurm_time(value: str) -> str:
  """sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or UNLIMITED)."""
  if not _SLURM_TIME.fullmatch(value) and value.upper() not in ('UNLIMITED', 'INFINITE'):
    raise LaunchError(f'--time {value!r}: not a SLURM time limit; use minutes, MM:SS, '
                      'HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 24:00:00 or 1-12:00:00)')
  return value


def _gcloud(args: argparse.Namespace, verb: str, *positional: str) -> list[str]:
  base = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *(positional or (args.name,)),
          f'--zone={args.zone}']
  if args.project:
    base.append(f'--project={args.project}')
  return base


def _ssh(args: argparse.Namespace, worker: str, command: str) -> str:
  return shlex.join(_gcloud(args, 'ssh') + [f'--worker={worker}', f'--command={command}'])


def _validate_tpu_name(name: str) -> str:
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', name or ''):
    raise LaunchError(f'--name {name!r}: TPU names are lower-case letters, digits and '
                      'hyphens, starting with a letter')
  return name


def tpu_plan(args: argparse.Namespace, overrides: list[str]) -> Plan:
  """Create or reuse the slice, copy and install the tree, start the job on all workers."""
  _validate_tpu_name(args.name)
  if args.action in ('logs', 'stop', 'delete'):
    return _tpu_control_plan(args)
  tpu = parse_accelerator(args.accelerator)
  config = validate_config(args.config)
  if Path(split_config(config)[0]).is_absolute():
    raise LaunchError(f'config {args.config!r}: must lie inside {ROOT}, the tree copied to '
                      'the TPU workers')
  # The workers' interpreter is not here: load the config with this one, or, where it
  # lacks aim-jax's dependencies, on every worker just before the job starts.
  remote_check = False
  shape = JobShape(tpu.devices, tpu.hosts)
  try:
    check_config_loads(args, config, overrides, None, shape)
  except ConfigUnavailable as e:
    remote_check = str(e)
  directory = validate_dir(args.dir, what='workdir' if args.job == 'train' else 'checkpoint',
                           require_gcs=True)
  env = [('AIM_JAX_DISTRIBUTED', 'auto')] + validate_env(args.env)
  notes = [f'{tpu.accelerator}: {tpu.chips} chips, {tpu.devices} JAX devices, '
           f'{tpu.hosts} worker(s), one JAX process each; runtime {args.version or tpu.runtime}',
           'Re-running this command resumes: the slice is reused (or re-created if '
           'preempted), the job restarts from the latest checkpoint in the workdir.']
  steps = _tpu_create_steps(args, tpu)
  if not args.no_install:
    steps += _tpu_install_steps(args)
  if remote_check:
    notes.append(f'{remote_check.split(": install")[0]}: the workers load it before starting')
  steps += _tpu_start_steps(args, config, directory, env, overrides,
                            shape if remote_check else None)
  return Plan(notes, steps)


def _tpu_create_steps(args: argparse.Namespace, tpu: TpuSlice) -> list[str]:
  describe = shlex.join(_gcloud(args, 'describe') + ['--format=value(state,acceleratorType)'])
  create = _gcloud(args, 'create') + [f'--accelerator-type={tpu.accelerator}',
                                      f'--version={args.version or tpu.runtime}']
  if args.spot:
    create.append('--spot')
  create += list(args.create_arg)
  missing = (f'echo "TPU {args.name} does not exist (--no-create)" >&2; exit 1' if args.no_create
             else shlex.join(create))
  return [
      f'read -r state accel < <({describe} 2>/dev/null || true) || true',
      'case "${state:-}" in',
      f'  PREEMPTED|TERMINATED) {shlex.join(_gcloud(args, "delete") + ["--quiet"])}; state= ;;',
      f'  STOPPED) {shlex.join(_gcloud(args, "start"))}; state=READY ;;',
      '  ""|READY) ;;',
      f'  *) echo "TPU {args.name} is $state: wait until it is READY" >&2; exit 1 ;;',
      'esac',
      'if [ -n "${state:-}" ] && [ -n "${accel:-}" ] && '
      f'[ "$accel" != {tpu.accelerator} ]; then',
      f'  echo "TPU {args.name} is a $accel, not a {tpu.accelerator}: use --name of another '
      'slice or delete this one" >&2; exit 1',
      'fi',
      f'if [ -z "${{state:-}}" ]; then {missing}; fi',
  ]


def _tpu_install_steps(args: argparse.Namespace) -> list[str]:
  tarball = f'/tmp/{args.name}-{SOURCE_TARBALL}'
  if (ROOT / '.git').exists():
    # Tracked and untracked-but-not-ignored files: what the user has, minus .venv etc.
    pack = (f'git -C {shlex.quote(str(ROOT))} ls-files -z --cached --others --exclude-standard'
            f' | tar -C {shlex.quote(str(ROOT))} --null --ignore-failed-read -czf {tarball} -T -')
  else:
    pack = (f'tar -C {shlex.quote(str(ROOT))} --exclude=.venv --exclude=.git '
            f'--exclude=__pycache__ -czf {tarball} .')
  jax = f'jax[tpu]=={args.jax_version}' if args.jax_version else 'jax[tpu]'
  remote = ' && '.join([
      f'rm -rf ~/{REMOTE_SRC}.new', f'mkdir -p ~/{REMOTE_SRC}.new',
      f'tar -xzf ~/{SOURCE_TARBALL} -C ~/{REMOTE_SRC}.new',
      f'rm -rf ~/{REMOTE_SRC}', f'mv ~/{REMOTE_SRC}.new ~/{REMOTE_SRC}',
      # The TPU images ship an older python: uv brings the one the project needs.
      # (--break-system-packages only where the image's pip refuses --user installs.)
      '(command -v uv >/dev/null || python3 -m pip install --user -q uv || '
      'python3 -m pip install --user -q --break-system-packages uv)',
      'export PATH=$HOME/.local/bin:$PATH',
      f'([ -x ~/{REMOTE_VENV}/bin/python ] || uv venv -q --python {args.python_version} '
      f'~/{REMOTE_VENV})',
      f'uv pip install -q --python ~/{REMOTE_VENV}/bin/python -e "$HOME/{REMOTE_SRC}[data]" '
      f'{shlex.quote(jax)}',
  ])
  scp = _gcloud(args, 'scp', tarball, f'{args.name}:{SOURCE_TARBALL}') + ['--worker=all']
  return [pack, shlex.join(scp), _ssh(args, 'all', remote)]


def _tpu_start_steps(args: argparse.Namespace, config: str, directory: str,
                     env: list[tuple[str, str]], overrides: list[str],
                     check_shape: JobShape | None = None) -> list[str]:
  """Start the job on every worker; with `check_shape`, each checks the config first."""
  argv = entry_argv(args.job, f'~/{REMOTE_VENV}/bin/python', config, directory, overrides)
  log, pid = f'~/{REMOTE_LOGS}/{args.job}.log', f'~/{REMOTE_LOGS}/{args.job}.pid'
  # The interpreter stays unquoted so that the worker's shell expands `~`.
  line = argv[0] + ' ' + shlex.join(argv[1:])
  check = [f'~/{REMOTE_VENV}/bin/python launch/launch.py '
           + shlex.join(check_config_argv(config, overrides, args.job, check_shape))]
  remote = ' && '.join([
      f'cd ~/{REMOTE_SRC}', f'mkdir -p ~/{REMOTE_LOGS}', *(check if check_shape else []),
      f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo "$(hostname): a '
      f'{args.job} job is still running (pid $(cat {pid})); stop it first" >&2; exit 1; fi',
      # nohup: the job outlives this ssh session; SIGTERM (stop) makes it checkpoint.
      f'{{ {_assignments(env)} nohup {line} > {log} 2>&1 < /dev/null & echo $! > {pid}; }}',
      f'echo "$(hostname): started pid $(cat {pid}), log {log}"',
  ])
  steps = [_ssh(args, 'all', remote)]
  if args.follow:
    steps.append(_ssh(args, '0', f'tail -n +1 -F {log}'))
  return steps


def _tpu_control_plan(args: argparse.Namespace) -> Plan:
  log, pid = f'~/{REMOTE_LOGS}/{args.job}.log', f'~/{REMOTE_LOGS}/{args.job}.pid'
  if args.action == 'logs':
    step = _ssh(args, args.worker, f'tail -n {args.lines} -F {log}')
    note = f'follow the {args.job} log of worker {args.worker} (Ctrl-C stops following only)'
  elif args.action == 'stop':
    step = _ssh(args, 'all', f'if [ -f {pid} ]; then kill -TERM "$(cat {pid})" 2>/dev/null '
                f'&& echo "$(hostname): sent SIGTERM to $(cat {pid})" || true; fi')
    note = (f'SIGTERM the {args.job} job on every worker: training saves a checkpoint, then '
            'exits; the same train command resumes it')
  else:
    step = shlex.join(_gcloud(args, 'delete') + ['--quiet'])
    note = f'delete the slice {args.name} (the gs:// workdir stays)'
  return Plan([note], [step])


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _add_job_args(p: argparse.ArgumentParser, default_python: str | None) -> None:
  p.add_argument('config', help='configs/NAME.py[:ARG]')
  p.add_argument('dir', metavar='DIR',
                 help='workdir (train) or checkpoint: a training workdir or converted '
                      'checkpoint (evaluate); local path or gs://BUCKET/PATH')
  p.add_argument('--job', choices=sorted(ENTRIES), default='train',
                 help='python -m aim_jax.train (default) or aim_jax.evaluate')
  if default_python is not None:
    p.add_argument('--python', default=default_python,
                   help='interpreter with aim-jax installed (default: %(default)s)')
  p.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                 help='extra environment for the job (repeatable)')
  p.add_argument('--dry-run', action='store_true', help='print the script, run nothing')
  p.add_argument('--no-config-check', action='store_true', help=NO_CHECK_HELP)


NO_CHECK_HELP = ('do not load the config before starting (by default it is imported and '
                 'get_config(ARG) called, as the job will, so a wrong row fails here)')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='launch', allow_abbrev=False, description=__doc__.split('\n\n')[0],
      epilog='Arguments --config.FIELD=VALUE pass through to the entry point; so does '
             'everything after a literal --.')
  sub = parser.add_subparsers(dest='launcher', required=True)
  python = sys.executable or 'python3'

  p = sub.add_parser('local', allow_abbrev=False,
                     help='one machine: all its devices, or N simulated CPU processes')
  _add_job_args(p, python)
  p.add_argument('--processes', type=int, default=1,
                 help='simulate a multi-host job with N local processes (CPU only)')
  p.add_argument('--cpu-devices', type=int, default=None,
                 help='run on CPU with K simulated devices per process')
  p.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')

  p = sub.add_parser('multinode', allow_abbrev=False,
                     help='one process of a multi-node job without SLURM')
  _add_job_args(p, python)
  p.add_argument('--coordinator', required=True, help='HOST:PORT of process 0')
  p.add_argument('--num-processes', type=int, required=True)
  p.add_argument('--process-id', type=int, required=True)
  p.add_argument('--local-device-ids', default='',
                 help='devices of this process, e.g. 0,1,2,3 (default: all visible)')

  p = sub.add_parser('slurm', allow_abbrev=False, help='submit launch/slurm.sbatch with sbatch')
  _add_job_args(p, python)
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus-per-node', type=int, default=8)
  p.add_argument('--process-per', choices=('gpu', 'node'), default='gpu',
                 help='one JAX process per GPU (default) or per node')
  p.add_argument('--job-name', default='aim-jax')
  p.add_argument('--partition')
  p.add_argument('--account')
  p.add_argument('--time', help='wall-clock limit, e.g. 24:00:00')
  p.add_argument('--cpus-per-task', type=int,
                 help=f'CPU cores per process for data loading (default: {CPUS_PER_GPU} per '
                      'GPU of the process)')
  p.add_argument('--output', help='sbatch --output pattern (default: slurm.sbatch\'s)')
  p.add_argument('--sbatch-arg', action='append', default=[],
                 help='extra sbatch flag, e.g. --sbatch-arg=--qos=high (repeatable)')

  p = sub.add_parser('tpu', allow_abbrev=False,
                     help='Cloud TPU VM slice: train/evaluate, or logs/stop/delete')
  tpu_sub = p.add_subparsers(dest='action', required=True)
  for action in ('train', 'evaluate'):
    q = tpu_sub.add_parser(action, allow_abbrev=False,
                           help=f'create or reuse the slice and start {action}')
    _add_tpu_common(q)
    q.add_argument('config', help='configs/NAME.py[:ARG] (inside this tree)')
    q.add_argument('dir', metavar='DIR', help='gs:// workdir (train) or checkpoint (evaluate)')
    q.add_argument('--accelerator', required=True, help='v4-32, v5litepod-16, v5p-8, v6e-8 ...')
    q.add_argument('--version', help='TPU runtime (default: the one for the generation)')
    q.add_argument('--spot', action='store_true', help='create a Spot (preemptible) slice')
    q.add_argument('--no-create', action='store_true', help='fail if the slice does not exist')
    q.add_argument('--no-install', action='store_true',
                   help='skip copying and installing the tree (already there)')
    q.add_argument('--create-arg', action='append', default=[],
                   help='extra flag for tpu-vm create, e.g. --create-arg=--network=NET')
    q.add_argument('--python-version', default='3.12', help='python on the workers (uv)')
    q.add_argument('--jax-version', help='pin jax[tpu]==VERSION (default: newest)')
    q.add_argument('--env', action='append', default=[], metavar='NAME=VALUE')
    q.add_argument('--follow', action='store_true', help='then follow worker 0\'s log')
    q.add_argument('--no-config-check', action='store_true', help=NO_CHECK_HELP)
    q.set_defaults(job=action)
  for action, helptext in (('logs', 'follow a worker\'s log'),
                           ('stop', 'SIGTERM the job on every worker (it checkpoints)'),
                           ('delete', 'delete the slice')):
    q = tpu_sub.add_parser(action, allow_abbrev=False, help=helptext)
    _add_tpu_common(q)
    q.add_argument('--job', choices=sorted(ENTRIES), default='train')
    if action == 'logs':
      q.add_argument('--worker', default='0', help='worker index, or all')
      q.add_argument('--lines', type=int, default=200)

  p = sub.add_parser('check-config', allow_abbrev=False,
                     help='load a config with its --config.FIELD=VALUE overrides and run the '
                          'job\'s own checks on it, as the job will')
  p.add_argument('config', help='configs/NAME.py[:ARG]')
  p.add_argument('--job', choices=sorted(ENTRIES), default='train',
                 help='the job whose checks run (evaluate: only those of any device count)')
  p.add_argument('--num-devices', type=int,
                 help='devices of the job: also check the mesh, batch sizes and the rest of '
                      'the training config on them (default: unknown, not checked)')
  p.add_argument('--num-processes', type=int, default=1,
                 help='JAX processes of the job (with --num-devices; default: %(default)s)')
  return parser


def _add_tpu_common(q: argparse.ArgumentParser) -> None:
  q.add_argument('--name', required=True, help='TPU VM name')
  q.add_argument('--zone', required=True, help='e.g. us-central2-b (v4), us-west4-a (v5e)')
  q.add_argument('--project', help='GCP project (default: gcloud\'s)')
  q.add_argument('--dry-run', action='store_true', help='print the script, run nothing')


def check_plan(args: argparse.Namespace, overrides: list[str]) -> Plan:
  """`check-config`: nothing to run; raises LaunchError if the config does not load or
  fails the job's checks."""
  config = validate_config(args.config)
  shape = None
  if args.num_devices is not None:
    shape = JobShape(positive('--num-devices', args.num_devices),
                     positive('--num-processes', args.num_processes))
  check_run_config(config, load_config_here(config, overrides), args.job, shape)
  where = f' on {shape}' if shape is not None and args.job == 'train' else ''
  return Plan([f'config {config} loads and passes the {args.job} checks{where}'], [])


PLANNERS = {'local': local_plan, 'multinode': multinode_plan, 'slurm': slurm_plan,
            'tpu': tpu_plan, 'check-config': check_plan}
TOOLS = {'slurm': 'sbatch (SLURM)', 'tpu': 'gcloud (Google Cloud CLI)'}


def plan_from_args(argv: Sequence[str]) -> tuple[Plan, argparse.Namespace]:
  """Parses and validates; raises LaunchError (or SystemExit for argparse errors)."""
  parser = build_parser()
  args, extra = parser.parse_known_args(list(argv))
  if args.launcher == 'check-config':
    overrides = config_args(extra)
    if overrides != extra:
      raise LaunchError(f'check-config: unexpected arguments {extra}: only --config.FIELD=VALUE')
  else:
    overrides = validate_overrides(extra)
  if overrides and args.launcher == 'tpu' and args.action not in ('train', 'evaluate'):
    raise LaunchError(f'tpu {args.action}: unexpected arguments {overrides}')
  return PLANNERS[args.launcher](args, overrides), args


def main(argv: Sequence[str] | None = None) -> int:
  try:
    plan, args = plan_from_args(sys.argv[1:] if argv is None else argv)
  except LaunchError as e:
    print(f'launch: error: {e}', file=sys.stderr)
    return 2
  if args.launcher == 'check-config':
    print(f'launch: {plan.notes[0]}')
    return 0
  if args.dry_run:
    sys.stdout.write(plan.script())
    return 0
  tool = TOOLS.get(args.launcher)
  if tool and not shutil.which(tool.split()[0]):
    print(f'launch: error: {tool.split()[0]} not found on PATH: install {tool}, or use '
          '--dry-run to see the commands', file=sys.stderr)
    return 2
  return plan.run()


if __name__ == '__main__':
  sys.exit(main())
