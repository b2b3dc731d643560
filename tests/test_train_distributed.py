"""Two processes on localhost (jax.distributed via JAX_COORDINATOR_ADDRESS) train together."""
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import cpu_env
from aim_jax import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_a_few_steps_together_and_agree(tmp_path):
  port = _free_port()
  workdir = tmp_path / 'two'
  procs = []
  for pid in range(2):
    env = cpu_env(2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                  JAX_PROCESS_ID=str(pid))
    cmd = [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py',
           '--workdir', str(workdir), '--config.total_steps=6', '--config.log_every_steps=2',
           '--config.checkpoint.every_steps=3', '--config.eval_every_steps=6',
           '--config.progress_bar=False']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  logs = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    logs.append(err)
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {pid}:\n{log[-4000:]}'
    assert "over 4 devices (2 processes)" in log

  def metrics(log):
    steps = re.findall(r'\] step (\d+)/6: accuracy=(\S+) .*grad_norm=(\S+) loss=(\S+)', log)
    return steps, re.findall(r'val top-1 (\S+)', log)

  # The loss is a global value: both processes report the same numbers every step.
  (train0, val0), (train1, val1) = metrics(logs[0]), metrics(logs[1])
  assert len(train0) == 3 and train0 == train1
  assert val0 == val1 and val0
  params, _ = checkpoints.restore_params_from_workdir(str(workdir))
  assert all(np.isfinite(v).all() for v in params['cls_head']['fc_cls'].values())
