"""Launchers: each validates before starting anything, prints exactly what it
runs (--dry-run), and ends in the same `python -m aim_jax.train` line.

Scripts are also executed against stand-ins for the cluster tools (`gcloud`,
`srun`, the interpreter) to check what reaches them, and the local launcher
trains the tiny config with two simulated processes for real.
"""

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT
from launch import launch

PY = sys.executable
# configs/tiny.py's batch sizes (8) divide over at most 8 devices: these fit up to 128.
BATCH_128 = ['--config.batch_size=128', '--config.eval.batch_size=128']
TPU = ['--name', 'aim-pod', '--zone', 'us-central2-b']


def dry(*argv: str) -> str:
  plan, args = launch.plan_from_args(list(argv))
  return plan.script()


def steps(script: str) -> list[str]:
  """Script lines that do something: no shebang, set, notes or cd."""
  return [ln for ln in script.splitlines()
          if not ln.startswith(('#', 'set -euo', 'cd '))]


def error_of(*argv: str) -> str:
  with pytest.raises(launch.LaunchError) as e:
    launch.plan_from_args(list(argv))
  return str(e.value)


def fake_tool(path: Path, body: str) -> Path:
  path.write_text('#!/usr/bin/env bash\n' + textwrap.dedent(body))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


# --------------------------------------------------------------------------
# local
# --------------------------------------------------------------------------


def test_local_one_process_execs_the_train_line(tmp_path):
  script = dry('local', 'configs/tiny.py:frames=4', str(tmp_path / 'wd'), '--python', PY,
               '--config.total_steps=3', '--', '--alsologtostderr')
  assert steps(script) == [
      f'exec {PY} -m aim_jax.train --config configs/tiny.py:frames=4 '
      f'--workdir {tmp_path / "wd"} --config.total_steps=3 --alsologtostderr']
  assert f'cd {ROOT}' in script.splitlines()


def test_local_relative_workdir_becomes_absolute_and_config_root_relative(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  script = dry('local', str(ROOT / 'configs' / 'tiny.py'), 'runs/a', '--python', PY)
  assert steps(script)[-1] == (f'exec {PY} -m aim_jax.train --config configs/tiny.py '
                               f'--workdir {tmp_path / "runs" / "a"}')


def test_local_gs_workdir_is_kept(tmp_path):
  script = dry('local', 'configs/tiny.py', 'gs://my-bucket/runs/tiny/', '--python', PY)
  assert steps(script)[-1].endswith('--workdir gs://my-bucket/runs/tiny')


@pytest.mark.parametrize('processes,devices', [(2, 2), (4, 1)])
def test_local_simulated_processes(tmp_path, processes, devices):
  script = dry('local', 'configs/tiny.py', str(tmp_path), '--python', PY,
               '--processes', str(processes), '--cpu-devices', str(devices), '--port', '4321')
  lines = steps(script)
  assert 'export JAX_PLATFORMS=cpu' in lines
  assert (f'export XLA_FLAGS="${{XLA_FLAGS:-}} --xla_force_host_platform_device_count={devices}"'
          in lines)
  assert (f'export JAX_COORDINATOR_ADDRESS=127.0.0.1:4321 JAX_NUM_PROCESSES={processes}'
          in lines)
  train = f'{PY} -m aim_jax.train --config configs/tiny.py --workdir {tmp_path}'
  started = [ln for ln in lines if ln.endswith(' &')]
  assert started == [f'JAX_PROCESS_ID={i} {train} &' for i in range(processes)]


def test_local_evaluate_uses_checkpoint_flag(tmp_path):
  script = dry('local', '--job', 'evaluate', 'configs/tiny.py', str(tmp_path), '--python', PY,
               '--', '--which', 'best')
  assert steps(script)[-1] == (f'exec {PY} -m aim_jax.evaluate --config configs/tiny.py '
                               f'--checkpoint {tmp_path} --which best')


def test_local_processes_fail_together(tmp_path):
  """One failed process stops the others; the launcher fails; env reaches each."""
  fake = fake_tool(tmp_path / 'python', f'''
      echo "$JAX_PROCESS_ID $JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $JAX_PLATFORMS $XLA_FLAGS \\
        | $*" > {tmp_path}/p$JAX_PROCESS_ID
      if [ "$JAX_PROCESS_ID" = 1 ]; then
        while [ ! -f {tmp_path}/p0 ] || [ ! -f {tmp_path}/p2 ]; do sleep 0.05; done
        exit 3
      fi
      exec sleep 60
  ''')
  t0 = time.time()
  rc = launch.main(['local', 'configs/tiny.py', str(tmp_path / 'wd'), '--python', str(fake),
                    '--processes', '3', '--cpu-devices', '2', '--port', '5555',
                    '--no-config-check'])
  assert rc == 1
  assert time.time() - t0 < 30, 'the sleeping processes were not stopped'
  for i in range(3):
    seen = (tmp_path / f'p{i}').read_text().split()
    assert seen[:4] == [str(i), '3', '127.0.0.1:5555', 'cpu']
    assert '--xla_force_host_platform_device_count=2' in seen
    assert seen[seen.index('|') + 1:] == ['-m', 'aim_jax.train', '--config', 'configs/tiny.py',
                                          '--workdir', str(tmp_path / 'wd')]


def test_local_processes_that_end_together_are_a_success(tmp_path):
  # A loop of `wait -n` read two processes ending at the same moment as a failure about
  # once in 300 (bash reaps both at once; the second `wait -n` finds no child, exit 127);
  # four processes that exit at once failed it on the first try.
  fake = fake_tool(tmp_path / 'python', 'exit 0')
  for _ in range(10):
    assert launch.main(['local', 'configs/tiny.py', str(tmp_path / 'wd'), '--python', str(fake),
                        '--processes', '4', '--cpu-devices', '1', '--no-config-check']) == 0


def test_local_wrapper_script_dry_run_and_error_exit(tmp_path):
  env = dict(os.environ, PYTHON=PY)   # the launcher loads the config: it needs aim-jax
  out = subprocess.run([str(ROOT / 'launch' / 'local.sh'), 'configs/tiny.py', str(tmp_path),
                        '--dry-run'], capture_output=True, text=True, cwd=tmp_path, env=env)
  assert out.returncode == 0, out.stderr
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith('exec ') and last.endswith(
      f'-m aim_jax.train --config configs/tiny.py --workdir {tmp_path}')
  out = subprocess.run([str(ROOT / 'launch' / 'local.sh'), 'configs/nope.py', str(tmp_path),
                        '--dry-run'], capture_output=True, text=True, env=env)
  assert out.returncode == 2 and out.stdout == ''
  assert ("launch: error: config 'configs/nope.py': file configs/nope.py does not exist"
          in out.stderr)


# --------------------------------------------------------------------------
# argument errors (caught before anything starts)
# --------------------------------------------------------------------------


@pytest.mark.parametrize('argv,message', [
    (['local', 'configs/missing.py', '/tmp/w'], 'configs/missing.py does not exist'),
    (['local', 'configs/missing.py:b16_f8', '/tmp/w'], 'configs/missing.py does not exist'),
    (['local', 'configs/tiny', '/tmp/w'], 'not a Python config file'),
    (['local', 'configs/tiny.py:', '/tmp/w'], 'empty argument after ":"'),
    (['local', 'configs/tiny.py', 's3://bucket/w'], 'scheme s3:// is not supported'),
    (['local', 'configs/tiny.py', 'gcs://bucket/w'], 'scheme gcs:// is not supported'),
    (['local', 'configs/tiny.py', 'gs://B_ad/w'], "'B_ad' is not a valid bucket name"),
    (['local', 'configs/tiny.py', '/tmp/w', '--processes', '0'], '--processes must be >= 1'),
    (['local', 'configs/tiny.py', '/tmp/w', '--processes', '2'], 'add --cpu-devices K'),
    (['local', 'configs/tiny.py', '/tmp/w', '--cpu-devices', '0'], '--cpu-devices must be >= 1'),
    (['local', 'configs/tiny.py', '/tmp/w', '--total_steps=3'],
     "unknown argument '--total_steps=3'"),
    (['local', 'configs/tiny.py', '/tmp/w', '--env', 'NOEQUALS'], 'expected NAME=VALUE'),
    (['local', '--job', 'evaluate', 'configs/tiny.py', '/nonexistent/ckpt'],
     "checkpoint '/nonexistent/ckpt'"),
    (['multinode', '--coordinator', 'node0:12355', '--num-processes', '2', '--process-id', '2',
      'configs/tiny.py', '/tmp/w'], '--process-id 2: must be in 0..1'),
    (['multinode', '--coordinator', 'node0:12355', '--num-processes', '0', '--process-id', '0',
      'configs/tiny.py', '/tmp/w'], '--num-processes must be >= 1'),
    (['multinode', '--coordinator', 'node0', '--num-processes', '2', '--process-id', '0',
      'configs/tiny.py', '/tmp/w'], 'expected HOST:PORT'),
    (['multinode', '--coordinator', 'node0:99999', '--num-processes', '2', '--process-id', '0',
      'configs/tiny.py', '/tmp/w'], 'port in 1..65535'),
    (['slurm', '--nodes', '0', 'configs/tiny.py', '/tmp/w'], '--nodes must be >= 1'),
    (['slurm', '--gpus-per-node', '0', 'configs/tiny.py', '/tmp/w'],
     '--gpus-per-node must be >= 1'),
    (['slurm', '--cpus-per-task', '0', 'configs/tiny.py', '/tmp/w'],
     '--cpus-per-task must be >= 1'),
])
def test_argument_errors_name_the_argument(argv, message):
  assert message in error_of(*argv)


def test_a_config_file_returning_a_dict_is_named(tmp_path):
  config = tmp_path / 'dict_config.py'
  config.write_text("def get_config():\n  return {'model': {'name': 'tiny'}}\n")
  assert (f'get_config() of {config} returned a dict, not an ml_collections.ConfigDict'
          in error_of('local', str(config), str(tmp_path / 'w')))


def test_argparse_errors_exit_2_without_running(capsys):
  with pytest.raises(SystemExit) as e:
    launch.plan_from_args(['slurm', '--nodes', 'two', 'configs/tiny.py', '/tmp/w'])
  assert e.value.code == 2
  assert "invalid int value: 'two'" in capsys.readouterr().err


# --------------------------------------------------------------------------
# the config is loaded as the job will load it, before anything starts
# --------------------------------------------------------------------------

BAD_ROW = "config 'configs/k400.py:b16_f9': ValueError: k400 row 'b16_f9' is not one of"
LAUNCHERS = {
    'local': ['local'],
    'multinode': ['multinode', '--coordinator', 'n0:1', '--num-processes', '2',
                  '--process-id', '0'],
    'slurm': ['slurm'],
    'tpu': ['tpu', 'train', '--name', 'aim-pod', '--zone', 'z', '--accelerator', 'v4-8'],
}


@pytest.mark.parametrize('launcher', list(LAUNCHERS))
def test_a_config_row_that_does_not_exist_fails_before_anything_starts(launcher):
  python = [] if launcher == 'tpu' else ['--python', PY]
  message = error_of(*LAUNCHERS[launcher], 'configs/k400.py:b16_f9', 'gs://my-bucket/w',
                     *python)
  assert message.startswith(BAD_ROW) and '\n' not in message
  # ... and a row that exists passes (the sentence above is the only difference).
  dry(*LAUNCHERS[launcher], 'configs/k400.py:b16_f8', 'gs://my-bucket/w', *python)


@pytest.mark.parametrize('launcher', list(LAUNCHERS))
def test_an_override_of_a_field_that_does_not_exist_fails(launcher):
  python = [] if launcher == 'tpu' else ['--python', PY]
  message = error_of(*LAUNCHERS[launcher], 'configs/tiny.py', 'gs://my-bucket/w', *python,
                     '--config.data.trian_files=x')
  assert message == ("--config.data.trian_files: config 'configs/tiny.py' has no field "
                     "'data.trian_files'")
  dry(*LAUNCHERS[launcher], 'configs/tiny.py', 'gs://my-bucket/w', *python,
      '--config.data.train_files=x', '--config.model.swin.depths=(3,3,3,3)')
  # As the job's flag parser: a tuple element is not a field of its own.
  assert error_of(*LAUNCHERS[launcher], 'configs/tiny.py', 'gs://my-bucket/w', *python,
                  '--config.model.swin.depths.0=3') == (
      "--config.model.swin.depths.0: config 'configs/tiny.py' has no field "
      "'model.swin.depths.0'")


def test_wrapper_script_exits_2_with_one_line_for_a_missing_row(tmp_path):
  out = subprocess.run([str(ROOT / 'launch' / 'slurm_submit.sh'), 'configs/k400.py:b16_f9',
                        str(tmp_path), '--dry-run'], capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=PY))
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.startswith('launch: error: ' + BAD_ROW) and out.stderr.count('\n') == 1


def test_no_config_check_skips_loading():
  dry('slurm', 'configs/k400.py:b16_f9', '/tmp/w', '--python', PY, '--no-config-check')


def test_another_interpreter_loads_the_config_in_a_subprocess(tmp_path):
  """--python other than the launcher's own: `launch.py check-config` runs with it."""
  other = fake_tool(tmp_path / 'python', f'exec {PY} "$@"\n')
  message = error_of('slurm', 'configs/k400.py:b16_f9', '/tmp/w', '--python', str(other))
  assert message.startswith(BAD_ROW)
  dry('slurm', 'configs/k400.py:b16_f8', '/tmp/w', '--python', str(other))
  # An interpreter without aim-jax's dependencies (-S: no site-packages) cannot run the job.
  bare = fake_tool(tmp_path / 'bare', f'exec {PY} -S "$@"\n')
  assert 'install aim-jax there, or pass --no-config-check' in error_of(
      'slurm', 'configs/k400.py:b16_f8', '/tmp/w', '--python', str(bare))
  assert '--no-config-check to skip the check' in error_of(
      'slurm', 'configs/k400.py:b16_f8', '/tmp/w', '--python', str(tmp_path / 'missing'))


def test_check_config_command():
  assert launch.main(['check-config', 'configs/ssv2.py:l14_f16']) == 0
  assert launch.main(['check-config', 'configs/ssv2.py:l14_f64']) == 2


def test_tpu_without_dependencies_here_checks_the_config_on_the_workers(monkeypatch):
  def unavailable(spec, overrides=(), root=ROOT):
    raise launch.ConfigUnavailable(f"config {spec!r}: cannot be loaded by python3 (no module "
                                   "'jax'): install aim-jax there, or pass --no-config-check")
  monkeypatch.setattr(launch, 'load_config_here', unavailable)
  script = dry('tpu', 'train', *TPU, '--accelerator', 'v4-8', 'configs/k400.py:b16_f8',
               'gs://my-bucket/w', '--config.total_steps=3', '--', '--alsologtostderr')
  assert "# config 'configs/k400.py:b16_f8': cannot be loaded by python3 (no module 'jax'): " \
         'the workers load it before starting' in script
  start = shlex.split(next(ln for ln in steps(script) if 'nohup' in ln))[-1]
  check = ('~/aim-jax-venv/bin/python launch/launch.py check-config configs/k400.py:b16_f8 '
           '--job train --num-devices 4 --num-processes 1 --config.total_steps=3 && ')
  assert check in start and start.index(check) < start.index('nohup')


# --------------------------------------------------------------------------
# override values and the job's own checks, on the job's devices where known
# --------------------------------------------------------------------------

SLURM_16 = ['slurm', '--nodes', '2', '--gpus-per-node', '8']   # 16 GPUs, 16 processes
ON_16 = "config 'configs/tiny.py' on 16 devices, 16 processes: "


@pytest.mark.parametrize('launcher', list(LAUNCHERS))
@pytest.mark.parametrize('override,message', [
    ('--config.batch_size=abc', "--config.batch_size=abc: not a valid int for field batch_size "
                                "of config 'configs/tiny.py' (invalid literal for int()"),
    ('--config.optimizer.lr=fast', '--config.optimizer.lr=fast: not a valid float'),
    ('--config.data.autotune=maybe', '--config.data.autotune=maybe: not a valid bool'),
    ('--config.mesh=3', '--config.mesh=3: not a valid ConfigDict'),
    ('--config.model.swin.depths[0]=3',   # a field, but a tuple's element cannot be set
     '--config.model.swin.depths[0]=3: IndexError: 0 is not a valid index'),
])
def test_an_override_value_that_does_not_parse_names_the_flag(launcher, override, message):
  python = [] if launcher == 'tpu' else ['--python', PY]
  error = error_of(*LAUNCHERS[launcher], 'configs/tiny.py', 'gs://my-bucket/w', *python,
                   override)
  assert error.startswith(message) and '\n' not in error


@pytest.mark.parametrize('argv', [
    ['local'], ['local', '--job', 'evaluate'],
    ['multinode', '--coordinator', 'n0:1', '--num-processes', '2', '--process-id', '0'],
    SLURM_16, ['tpu', 'evaluate', '--name', 'aim-pod', '--zone', 'z', '--accelerator', 'v4-8']])
@pytest.mark.parametrize('override,message', [
    ('--config.model.width=0', 'model.width=0 must be a positive integer'),
    ('--config.model.heads=3', 'model.width 32 is not divisible by model.heads 3'),
    ('--config.optimizer.lr=-1', 'optimizer.lr=-1.0 must be >= 0'),
    ('--config.data.flip_prob=2', 'data.flip_prob=2.0 must be in [0, 1]'),
    ('--config.data.source=csv', "data.source='csv' must be one of"),
])
def test_a_value_out_of_range_fails_whatever_the_devices(tmp_path, argv, override, message):
  """Model, data and optimizer checks: also without a known device count, and for evaluate."""
  python = [] if argv[0] == 'tpu' else ['--python', PY]
  workdir = 'gs://my-bucket/w' if argv[0] == 'tpu' else str(tmp_path)
  error = error_of(*argv, 'configs/tiny.py', workdir, *python, *BATCH_128, override)
  assert error.startswith("config 'configs/tiny.py'") and message in error, error
  dry(*argv, 'configs/tiny.py', workdir, *python, *BATCH_128)   # passes without the override


def test_a_mesh_that_does_not_fit_the_devices_names_mesh():
  error = error_of(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', PY,
                   '--config.mesh.model=3', *BATCH_128)
  assert error == (ON_16 + "mesh: 16 devices are not divisible by the fixed axes {'data': -1, "
                   "'fsdp': 1, 'model': 3} (config fields mesh.data/fsdp/model)")
  error = error_of(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', PY,
                   '--config.mesh.data=4', *BATCH_128)
  assert error.startswith(ON_16 + "mesh {'data': 4, 'fsdp': 1, 'model': 1} needs 4 devices, "
                          'but there are 16')
  dry(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', PY, '--config.mesh.model=2',
      *BATCH_128)


def test_a_batch_that_does_not_divide_over_the_devices_names_batch_size():
  error = error_of(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', PY,
                   '--config.batch_size=7')
  assert error == (ON_16 + 'batch_size=7 (per micro-batch 7 with grad_accum_steps=1) is not '
                   'divisible by the data-parallel size 16 (mesh.data x mesh.fsdp)')
  # tiny's own eval.batch_size=8 does not divide over 16 devices either.
  assert error_of(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', PY,
                  '--config.batch_size=32').startswith(ON_16 + 'eval.batch_size=8 is not')
  # The same config fits one 8-GPU node.
  dry('slurm', 'configs/tiny.py', '/tmp/w', '--python', PY)


def test_a_good_override_is_accepted_and_reaches_the_job():
  script = dry(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', PY, '--config.batch_size=32',
               '--config.eval.batch_size=16', '--config.optimizer.lr=0.003')
  assert '# 2 node(s) x 8 GPU(s), one process per gpu: 16 JAX process(es), 16 devices' in script
  assert steps(script)[-1].endswith(
      '-m aim_jax.train --config configs/tiny.py --workdir /tmp/w --config.batch_size=32 '
      '--config.eval.batch_size=16 --config.optimizer.lr=0.003')


@pytest.mark.parametrize('per,processes,ok', [('gpu', 16, False), ('node', 2, True)])
def test_slurm_process_count_follows_process_per(per, processes, ok):
  """mesh.model=-1 leaves a data-parallel size of 1: only the process count is left to
  divide the batch (one process per GPU: 16; per node: 2)."""
  argv = [*SLURM_16, '--process-per', per, 'configs/tiny.py', '/tmp/w', '--python', PY,
          '--config.mesh.data=1', '--config.mesh.model=-1', '--config.batch_size=8']
  if ok:
    dry(*argv)
  else:
    assert error_of(*argv) == ("config 'configs/tiny.py' on 16 devices, 16 processes: "
                               'batch_size=8 is not divisible by the number of processes 16')


@pytest.mark.parametrize('argv,devices', [
    (['local', '--processes', '2', '--cpu-devices', '4'], 8),
    (['local', '--cpu-devices', '4'], 4),
    (['multinode', '--coordinator', 'n0:1', '--num-processes', '2', '--process-id', '1',
      '--local-device-ids', '0,1,2,3'], 8),
    (['tpu', 'train', *TPU, '--accelerator', 'v4-32'], 16),   # 16 chips, one device each
    (['tpu', 'train', *TPU, '--accelerator', 'v3-32'], 32),   # 32 TensorCores
])
def test_each_launcher_checks_on_its_device_count(argv, devices):
  python = [] if argv[0] == 'tpu' else ['--python', PY]
  job = [*argv, 'configs/tiny.py', 'gs://my-bucket/w', *python]
  error = error_of(*job, f'--config.batch_size={devices // 2}')
  assert f'on {devices} devices' in error and f'data-parallel size {devices}' in error, error
  dry(*job, f'--config.batch_size={devices}', f'--config.eval.batch_size={devices}')


@pytest.mark.parametrize('argv', [
    ['multinode', '--coordinator', 'n0:1', '--num-processes', '2', '--process-id', '0'],
    ['local', '--job', 'evaluate', '--processes', '2', '--cpu-devices', '8'],
    ['tpu', 'evaluate', *TPU, '--accelerator', 'v4-32']])
def test_no_device_checks_where_the_devices_are_unknown_or_for_evaluate(tmp_path, argv):
  python = [] if argv[0] == 'tpu' else ['--python', PY]
  workdir = 'gs://my-bucket/w' if argv[0] == 'tpu' else str(tmp_path)
  dry(*argv, 'configs/tiny.py', workdir, *python, '--config.batch_size=7',
      '--config.mesh.model=3')


def test_local_counts_the_gpus_where_it_can(tmp_path, monkeypatch):
  fake_tool(tmp_path / 'nvidia-smi', '''
      echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"
      echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"
  ''')
  monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
  for name in ('CUDA_VISIBLE_DEVICES', 'JAX_PLATFORMS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(launch, 'CUDA_PLUGINS', ('json',))   # "jax has its CUDA plugin"
  assert launch.local_gpu_count(PY, {}) == 2
  assert launch.local_gpu_count(PY, {'CUDA_VISIBLE_DEVICES': '1'}) == 1
  assert launch.local_gpu_count(PY, {'JAX_PLATFORMS': 'cpu'}) is None
  assert launch.local_gpu_count(str(tmp_path / 'python'), {}) is None   # another interpreter
  error = error_of('local', 'configs/tiny.py', str(tmp_path), '--python', PY,
                   '--config.batch_size=3')
  assert error.startswith("config 'configs/tiny.py' on 2 devices, 1 process: batch_size=3 ")
  dry('local', 'configs/tiny.py', str(tmp_path), '--python', PY, '--config.batch_size=3',
      '--env', 'CUDA_VISIBLE_DEVICES=0')
  monkeypatch.setattr(launch, 'CUDA_PLUGINS', ('no_such_cuda_plugin',))
  assert launch.local_gpu_count(PY, {}) is None


def test_overrides_after_double_dash_are_read_as_the_job_reads_them():
  """`--config.FIELD VALUE` (absl takes the next argument) and a bare boolean."""
  job = ['local', '--processes', '2', '--cpu-devices', '4', 'configs/tiny.py', '/tmp/w',
         '--python', PY, '--']
  assert 'batch_size=12 (per micro-batch 12' in error_of(*job, '--config.batch_size', '12')
  dry(*job, '--config.batch_size', '16', '--config.data.autotune', '--alsologtostderr')
  assert launch.config_args(['--config.a', '1', '--config.b', '--x', '--config.c=2', 'y']) == [
      '--config.a', '1', '--config.b', '--config.c=2']


def test_another_interpreter_checks_on_the_same_devices(tmp_path):
  """`launch.py check-config --num-devices --num-processes` with the job's interpreter."""
  other = fake_tool(tmp_path / 'python', f'exec {PY} "$@"\n')
  error = error_of(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', str(other),
                   '--config.batch_size=7')
  assert error.startswith(ON_16 + 'batch_size=7 (per micro-batch 7')
  dry(*SLURM_16, 'configs/tiny.py', '/tmp/w', '--python', str(other), *BATCH_128)


@pytest.mark.parametrize('argv,rc', [
    (['--num-devices', '16', '--num-processes', '2'], 2),
    (['--num-devices', '16', '--num-processes', '2', *BATCH_128], 0),
    (['--num-devices', '8', '--num-processes', '3'], 2),     # 8 is not divisible by 3
    (['--num-devices', '16', '--job', 'evaluate'], 0),        # evaluate: no device checks
    (['--job', 'evaluate', '--config.model.width=0'], 2),
    (['--config.batch_size=abc'], 2),
    ([], 0),
    (['--alsologtostderr'], 2),
])
def test_check_config_command_checks_values_and_devices(argv, rc, capsys):
  assert launch.main(['check-config', 'configs/tiny.py', *argv]) == rc
  out = capsys.readouterr()
  if rc:
    assert out.err.startswith('launch: error: ') and out.err.count('\n') == 1
  else:
    assert out.out.startswith("launch: config configs/tiny.py loads and passes the ")


def test_wrapper_script_refuses_a_bad_value_before_submitting(tmp_path):
  out = subprocess.run([str(ROOT / 'launch' / 'slurm_submit.sh'), '--nodes', '2',
                        '--gpus-per-node', '8', 'configs/tiny.py', str(tmp_path),
                        '--config.batch_size=abc', '--dry-run'],
                       capture_output=True, text=True, env=dict(os.environ, PYTHON=PY))
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.startswith('launch: error: --config.batch_size=abc: not a valid int')
  assert out.stderr.count('\n') == 1


# --------------------------------------------------------------------------
# multinode
# --------------------------------------------------------------------------


@pytest.mark.parametrize('n,pid', [(2, 0), (2, 1), (16, 15)])
def test_multinode_sets_the_three_variables(n, pid):
  script = dry('multinode', '--coordinator', '10.0.0.1:12355', '--num-processes', str(n),
               '--process-id', str(pid), 'configs/tiny.py', 'gs://my-bucket/run', '--python', PY,
               '--config.batch_size=64')
  assert steps(script) == [
      'export JAX_COORDINATOR_ADDRESS=10.0.0.1:12355', f'export JAX_NUM_PROCESSES={n}',
      f'export JAX_PROCESS_ID={pid}',
      f'exec {PY} -m aim_jax.train --config configs/tiny.py --workdir gs://my-bucket/run '
      '--config.batch_size=64']


def test_multinode_local_workdir_warns_about_shared_storage():
  script = dry('multinode', '--coordinator', 'n0:1', '--num-processes', '2', '--process-id',
               '0', 'configs/tiny.py', '/shared/run', '--local-device-ids', '0,1', '--python', PY)
  assert '# /shared/run must be on a file system every node shares' in script
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1' in script


# --------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------


@pytest.mark.parametrize('nodes,gpus,per,tasks', [(1, 8, 'gpu', 8), (2, 8, 'gpu', 8),
                                                  (4, 4, 'node', 1), (16, 8, 'node', 1)])
def test_slurm_submits_the_batch_script_with_the_job_shape(nodes, gpus, per, tasks):
  script = dry('slurm', '--nodes', str(nodes), '--gpus-per-node', str(gpus), '--process-per',
               per, 'configs/tiny.py:frames=8', 'gs://my-bucket/run', '--python', PY,
               '--time', '24:00:00', '--partition', 'a100', '--config.init_from=gs://my-bucket/c',
               *BATCH_128)
  [line] = steps(script)
  assert shlex.split(line) == [
      'sbatch', '--job-name=aim-jax', f'--nodes={nodes}', f'--ntasks-per-node={tasks}',
      f'--gpus-per-node={gpus}', f'--chdir={ROOT}', f'--export=ALL,AIM_SLURM_PROCESS_PER={per}',
      '--partition=a100', '--time=24:00:00', f'--cpus-per-task={8 * gpus // tasks}',
      str(ROOT / 'launch' / 'slurm.sbatch'),
      PY, '-m', 'aim_jax.train', '--config', 'configs/tiny.py:frames=8',
      '--workdir', 'gs://my-bucket/run', '--config.init_from=gs://my-bucket/c', *BATCH_128]
  assert f'{nodes * tasks} JAX process(es), {nodes * gpus} devices' in script


@pytest.mark.parametrize('per,gpus_on_node,expected', [('node', '4', '0,1,2,3'),
                                                       ('gpu', '4', '')])
def test_slurm_batch_script_runs_srun_with_device_ids(tmp_path, per, gpus_on_node, expected):
  fake_tool(tmp_path / 'srun', f'''
      out={tmp_path}/srun.out
      printf 'ids=%s tf=%s ' "${{JAX_LOCAL_DEVICE_IDS:-}}" "$TF_CPP_MIN_LOG_LEVEL" > "$out"
      echo "cpus=$SRUN_CPUS_PER_TASK args=$*" >> "$out"
  ''')
  env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', SLURM_JOB_ID='77',
             SLURM_JOB_NUM_NODES='2', SLURM_JOB_NODELIST='gpu[01-02]', SLURM_NTASKS='2',
             SLURM_GPUS_ON_NODE=gpus_on_node, AIM_SLURM_PROCESS_PER=per, SLURM_CPUS_PER_TASK='12')
  for k in ('JAX_LOCAL_DEVICE_IDS', 'TF_CPP_MIN_LOG_LEVEL', 'SRUN_CPUS_PER_TASK'):
    env.pop(k, None)
  out = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch'), PY, '-m',
                        'aim_jax.train', '--config', 'configs/tiny.py', '--workdir', '/w'],
                       env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  # srun no longer inherits sbatch's --cpus-per-task (Slurm >= 22.05): passed on explicitly.
  assert (tmp_path / 'srun.out').read_text().strip() == (
      f'ids={expected} tf=1 cpus=12 args=--kill-on-bad-exit=1 {PY} -m aim_jax.train '
      '--config configs/tiny.py --workdir /w')


@pytest.mark.parametrize('extra,expected', [
    ([], 8), (['--process-per', 'node'], 64), (['--gpus-per-node', '4', '--process-per', 'node'],
                                               32), (['--cpus-per-task', '14'], 14)])
def test_slurm_cpus_per_task_defaults_to_8_per_gpu_of_the_process(extra, expected):
  script = dry('slurm', 'configs/tiny.py', '/tmp/w', '--python', PY, *extra)
  assert f'--cpus-per-task={expected} ' in steps(script)[0]
  assert f'{expected} CPU core(s) per process' in script


def test_slurm_batch_script_asks_for_8_cores_per_task_when_submitted_directly():
  header = (ROOT / 'launch' / 'slurm.sbatch').read_text()
  assert '#SBATCH --ntasks-per-node=8\n' in header and '#SBATCH --cpus-per-task=8\n' in header


@pytest.mark.parametrize('time_limit', ['90', '0', '30:00', '24:00:00', '100:00:00', '1-12',
                                        '1-12:30', '1-12:00:00', 'UNLIMITED'])
def test_slurm_time_formats_are_accepted(time_limit):
  [line] = steps(dry('slurm', 'configs/tiny.py', '/tmp/w', '--no-config-check',
                     '--time', time_limit))
  assert f' --time={time_limit} ' in line


@pytest.mark.parametrize('time_limit', ['99x', '', '1-', '-5', '1:2:3:4', '1-2:3:4:5', '1h',
                                        '24:00:00 ', '1.5'])
def test_slurm_time_that_is_not_a_slurm_time_is_refused(time_limit):
  assert error_of('slurm', 'configs/tiny.py', '/tmp/w', '--no-config-check', '--time',
                  time_limit).startswith(f'--time {time_limit!r}: not a SLURM time limit')


def test_slurm_batch_script_without_a_command_is_a_usage_error():
  out = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch')], capture_output=True,
                       text=True)
  assert out.returncode == 2 and 'usage: sbatch launch/slurm.sbatch' in out.stderr


# --------------------------------------------------------------------------
# Cloud TPU
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name,chips,devices,hosts,runtime', [
    ('v2-8', 4, 8, 1, 'tpu-ubuntu2204-base'),
    ('v3-32', 16, 32, 4, 'tpu-ubuntu2204-base'),
    ('v4-8', 4, 4, 1, 'tpu-ubuntu2204-base'),
    ('v4-32', 16, 16, 4, 'tpu-ubuntu2204-base'),
    ('v4-128', 64, 64, 16, 'tpu-ubuntu2204-base'),
    ('v5p-8', 4, 4, 1, 'v2-alpha-tpuv5'),
    ('v5p-128', 64, 64, 16, 'v2-alpha-tpuv5'),
    ('v5litepod-8', 8, 8, 1, 'v2-alpha-tpuv5-lite'),
    ('v5litepod-16', 16, 16, 4, 'v2-alpha-tpuv5-lite'),
    ('v5litepod-256', 256, 256, 64, 'v2-alpha-tpuv5-lite'),
    ('v6e-8', 8, 8, 1, 'v2-alpha-tpuv6e'),
    ('v6e-64', 64, 64, 16, 'v2-alpha-tpuv6e'),
])
def test_tpu_accelerator_types(name, chips, devices, hosts, runtime):
  s = launch.parse_accelerator(name)
  assert (s.chips, s.devices, s.hosts, s.runtime) == (chips, devices, hosts, runtime)


@pytest.mark.parametrize('name,message', [
    ('v4-30', 'multiple of 8'), ('v4-16384', 'multiple of 8 in 8..8192'),
    ('v5e-16', 'use v5litepod-16'), ('v5litepod-12', 'sizes 1, 4, 8, 16, 32, 64, 128, 256'),
    ('v6e-512', 'sizes 1, 4, 8'), ('v9-8', "unknown TPU generation 'v9'"),
    ('tpu', 'expected GENERATION-SIZE'), ('v3-16', 'sizes 8, 32, 64'),
])
def test_tpu_accelerator_errors(name, message):
  with pytest.raises(launch.LaunchError, match=message):
    launch.parse_accelerator(name)


@pytest.mark.parametrize('accelerator,runtime', [('v4-32', 'tpu-ubuntu2204-base'),
                                                 ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                                 ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_train_creates_copies_installs_and_starts_on_all_workers(accelerator, runtime):
  script = dry('tpu', 'train', *TPU, '--accelerator', accelerator, '--project', 'proj',
               'configs/tiny.py', 'gs://my-bucket/aim/tiny', '--spot',
               '--config.init_from=gs://my-bucket/ckpt/clip_b16', *BATCH_128)
  lines = steps(script)
  create = [ln for ln in lines if 'tpu-vm create' in ln]
  assert create == [
      'if [ -z "${state:-}" ]; then gcloud compute tpus tpu-vm create aim-pod '
      f'--zone=us-central2-b --project=proj --accelerator-type={accelerator} '
      f'--version={runtime} --spot; fi']
  scp = [shlex.split(ln) for ln in lines if 'tpu-vm scp' in ln]
  assert scp == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/aim-pod-aim-jax-src.tar.gz',
                  'aim-pod:aim-jax-src.tar.gz', '--zone=us-central2-b', '--project=proj',
                  '--worker=all']]
  ssh = [shlex.split(ln) for ln in lines if 'tpu-vm ssh' in ln]
  assert [s[:9] for s in ssh] == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'aim-pod',
                                   '--zone=us-central2-b', '--project=proj', '--worker=all']] * 2
  install, start = ssh[0][9], ssh[1][9]
  assert 'uv pip install' in install and '"$HOME/aim-jax[data]" \'jax[tpu]\'' in install
  assert ('AIM_JAX_DISTRIBUTED=auto nohup ~/aim-jax-venv/bin/python -m aim_jax.train '
          '--config configs/tiny.py --workdir gs://my-bucket/aim/tiny '
          '--config.init_from=gs://my-bucket/ckpt/clip_b16 --config.batch_size=128 '
          '--config.eval.batch_size=128 > ~/aim-jax-logs/train.log') in start


def test_tpu_evaluate_reuses_without_install_and_follows_the_log():
  script = dry('tpu', 'evaluate', *TPU, '--accelerator', 'v4-8', '--no-create', '--no-install',
               '--follow', 'configs/tiny.py', 'gs://my-bucket/aim/tiny')
  assert 'tpu-vm create' not in script and 'tpu-vm scp' not in script
  assert 'does not exist (--no-create)' in script
  ssh = [shlex.split(ln) for ln in steps(script) if 'tpu-vm ssh' in ln]
  assert '~/aim-jax-venv/bin/python -m aim_jax.evaluate --config configs/tiny.py ' \
         '--checkpoint gs://my-bucket/aim/tiny > ~/aim-jax-logs/evaluate.log' in ssh[0][-1]
  assert ssh[1][-2:] == ['--worker=0', '--command=tail -n +1 -F ~/aim-jax-logs/evaluate.log']


@pytest.mark.parametrize('argv,message', [
    (['--accelerator', 'v4-32', 'configs/tiny.py', '/tmp/local', *BATCH_128],
     'must be gs://BUCKET/PATH'),
    (['--accelerator', 'v4-30', 'configs/tiny.py', 'gs://my-bucket/w'], 'multiple of 8'),
    (['--accelerator', 'v4-32', 'configs/none.py', 'gs://my-bucket/w'], 'does not exist'),
])
def test_tpu_argument_errors(argv, message):
  assert message in error_of('tpu', 'train', *TPU, *argv)


def test_tpu_name_is_validated():
  assert 'lower-case letters' in error_of('tpu', 'stop', '--name', 'My_TPU', '--zone', 'z')


def test_all_dry_runs_are_valid_bash(tmp_path):
  for argv in (
      ['local', 'configs/tiny.py', str(tmp_path), '--processes', '2', '--cpu-devices', '2'],
      ['multinode', '--coordinator', 'h:1', '--num-processes', '2', '--process-id', '1',
       'configs/tiny.py', str(tmp_path)],
      ['slurm', 'configs/tiny.py', str(tmp_path)],
      ['tpu', 'train', *TPU, '--accelerator', 'v5litepod-16', 'configs/tiny.py', 'gs://bkt/x',
       *BATCH_128],
      ['tpu', 'logs', *TPU, '--worker', 'all'], ['tpu', 'stop', *TPU], ['tpu', 'delete', *TPU]):
    out = subprocess.run(['bash', '-n'], input=dry(*argv), capture_output=True, text=True)
    assert out.returncode == 0, (argv, out.stderr)


def _fake_gcloud(tmp_path: Path, describe: str) -> dict:
  """A `gcloud` that logs its calls, answers describe, and runs ssh --command on two
  fake workers (two $HOMEs), as the real one does over ssh."""
  workers = [tmp_path / 'w0', tmp_path / 'w1']
  for home in workers:
    venv = home / 'aim-jax-venv' / 'bin'
    venv.mkdir(parents=True)
    (home / 'aim-jax').mkdir()
    fake_tool(venv / 'python', '''
        echo "$AIM_JAX_DISTRIBUTED $*" > ~/ran
        trap 'echo terminated >> ~/ran; exit 0' TERM
        while true; do sleep 0.1; done
    ''')
  fake_tool(tmp_path / 'gcloud', f'''
      echo "$*" >> {tmp_path}/calls
      case "$4" in
        describe) [ -n "{describe}" ] && printf '{describe}\\n' && exit 0; exit 1 ;;
        ssh) for a in "$@"; do case "$a" in --command=*) cmd=${{a#--command=}};; esac; done
             for home in {' '.join(map(str, workers))}; do HOME=$home bash -c "$cmd"; done ;;
      esac
  ''')
  return dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}')


def _run(script: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True,
                        timeout=60)


@pytest.mark.parametrize('describe,expected', [
    ('', ['describe', 'create']),  # missing -> create
    ('READY\\tv4-32', ['describe']),  # reuse
    ('PREEMPTED\\tv4-32', ['describe', 'delete', 'create']),  # preempted -> re-create
])
def test_tpu_script_creates_reuses_or_recreates_then_starts_and_stops(tmp_path, describe,
                                                                       expected):
  env = _fake_gcloud(tmp_path, describe)
  script = dry('tpu', 'train', *TPU, '--accelerator', 'v4-32', '--no-install', 'configs/tiny.py',
               'gs://my-bucket/run', '--config.total_steps=5', *BATCH_128)
  try:
    out = _run(script, env)
    assert out.returncode == 0, out.stderr
    verbs = [ln.split()[3] for ln in (tmp_path / 'calls').read_text().splitlines()]
    assert verbs == expected + ['ssh']
    for home in ('w0', 'w1'):
      ran = _wait_for(tmp_path / home / 'ran', lambda text: text)
      assert ran.split() == [
          'auto', '-m', 'aim_jax.train', '--config', 'configs/tiny.py', '--workdir',
          'gs://my-bucket/run', '--config.total_steps=5', *BATCH_128]
    # A second start refuses while the job runs; stop sends SIGTERM to every worker.
    assert _run(script, env).returncode != 0
    assert _run(dry('tpu', 'stop', *TPU), env).returncode == 0
    for home in ('w0', 'w1'):
      ran = _wait_for(tmp_path / home / 'ran', lambda text: 'terminated' in text)
      assert ran.splitlines()[-1] == 'terminated'
  finally:
    for pid_file in tmp_path.glob('w*/aim-jax-logs/train.pid'):
      subprocess.run(['kill', '-KILL', pid_file.read_text().strip()], capture_output=True)


def _wait_for(path: Path, ready, timeout: float = 20.0) -> str:
  """The text of `path` once `ready(text)` holds (the fake job starts in the background)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    text = path.read_text() if path.exists() else ''
    if ready(text):
      return text
    time.sleep(0.1)
  return path.read_text() if path.exists() else ''


def test_tpu_script_refuses_a_slice_of_another_type(tmp_path):
  env = _fake_gcloud(tmp_path, 'READY\\tv4-8')
  script = dry('tpu', 'train', *TPU, '--accelerator', 'v4-32', '--no-install', 'configs/tiny.py',
               'gs://my-bucket/run', *BATCH_128)
  out = _run(script, env)
  assert out.returncode == 1
  assert 'TPU aim-pod is a v4-8, not a v4-32' in out.stderr
  assert 'ssh' not in (tmp_path / 'calls').read_text()


# --------------------------------------------------------------------------
# aim_jax.distributed: the variables the launchers set
# --------------------------------------------------------------------------


@pytest.mark.parametrize('env,expected', [
    ({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '2', 'JAX_LOCAL_DEVICE_IDS': '0,1,2,3'},
     {'local_device_ids': [0, 1, 2, 3]}),
    ({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '16'}, {'local_device_ids': None}),
    ({'AIM_JAX_DISTRIBUTED': 'auto'}, {}),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'},
     {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1,
      'local_device_ids': None}),
])
def test_distributed_initialize_gets_what_the_launchers_set(monkeypatch, env, expected):
  import jax

  from aim_jax import distributed
  for k in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'JAX_LOCAL_DEVICE_IDS', 'AIM_JAX_DISTRIBUTED',
            'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
            'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, '_initialized', False)
  assert distributed.maybe_initialize()
  assert calls == [expected]


# --------------------------------------------------------------------------
# the real thing: two processes train the tiny config together on CPU
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / 'aim_jax' / 'train.py').exists()
                    or not (ROOT / 'configs' / 'tiny.py').exists(),
                    reason='needs aim_jax/train.py and configs/tiny.py (training issue)')
def test_local_launcher_trains_tiny_with_two_simulated_processes(tmp_path):
  workdir = tmp_path / 'wd'
  out = subprocess.run(
      [str(ROOT / 'launch' / 'local.sh'), 'configs/tiny.py', str(workdir), '--python', PY,
       '--processes', '2', '--cpu-devices', '2', '--config.total_steps=4',
       '--config.log_every_steps=2', '--config.checkpoint.every_steps=4',
       '--config.eval_every_steps=1000'],
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert out.returncode == 0, out.stderr[-3000:]
  versions = json.loads((workdir / 'versions.json').read_text())
  assert (versions['process_count'], versions['device_count']) == (2, 4)
  assert (workdir / 'checkpoints' / '4').is_dir()


@pytest.mark.parametrize('code,requeued,exit_code', [(75, True, 0), (0, False, 0),
                                                     (2, False, 2), (3, False, 3)])
def test_sbatch_requeues_only_a_preempted_run(tmp_path, code, requeued, exit_code):
  # srun and scontrol stand-ins on PATH: the script's own exit-code logic is what runs.
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(f'#!/bin/sh\nexit {code}\n')
  (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='123',
             SLURM_JOB_NUM_NODES='1', SLURM_JOB_NODELIST='n1', SLURM_NTASKS='1')
  out = subprocess.run(['bash', str(ROOT / 'launch' / 'slurm.sbatch'), 'python', '-m',
                        'aim_jax.train'], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == exit_code, out.stderr
  args = tmp_path / 'scontrol.args'
  assert args.exists() == requeued
  if requeued:
    assert args.read_text().split() == ['requeue', '123']
