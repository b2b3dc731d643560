"""A training run never loses or corrupts work (docs/training.md, "What a run guarantees").

One lock per workdir, no checkpoint of a non-finite state, damaged steps moved aside
and skipped, a failed save stops the run at once, the workdir's config is its identity,
workdirs export like parameter checkpoints, and every command reports a user error in
one line. The tiny config (configs/tiny.py) on CPU; subprocesses where exit codes and
signals matter, shortened to 60 steps and shared between tests where they can be.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import cpu_env
from aim_jax import checkpoints, errors, run_config, train
from aim_jax import params as P
from aim_jax.convert import cli as convert_cli
from aim_jax.models.factory import build_model
from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 60 steps, checkpoints at 20, 40, 60 (2 kept), validation at 60: a resumable short run.
SHORT = ('--config.total_steps=60', '--config.checkpoint.every_steps=20',
         '--config.log_every_steps=5', '--config.progress_bar=False')


def _train_cmd(workdir, *overrides):
  return [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py',
          '--workdir', str(workdir), *SHORT, *overrides]


def _run(cmd, timeout=900, **env):
  return subprocess.run(cmd, cwd=ROOT, env=cpu_env(1, **env), capture_output=True, text=True,
                        timeout=timeout)


def _error_lines(stderr, prog):
  return [line for line in stderr.splitlines() if line.startswith(f'{prog}: ')]


def _steps(workdir, sub='checkpoints'):
  path = pathlib.Path(workdir) / sub
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def _snapshot(workdir):
  """Every file of a workdir -> (size, mtime, first bytes): what a refused run must not touch."""
  out = {}
  for p in sorted(pathlib.Path(workdir).rglob('*')):
    if p.is_file():
      st = p.stat()
      out[str(p.relative_to(workdir))] = (st.st_size, st.st_mtime_ns, p.read_bytes()[:256])
  return out


def _wait_for(path, proc, timeout=600):
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, f'the run ended before {path} appeared'
    assert time.time() < deadline, f'{path} did not appear in {timeout} s'
    time.sleep(0.05)


def _read_until(proc, needle, lines):
  for line in proc.stderr:
    lines.append(line)
    if needle in line:
      return
  raise AssertionError(f'the run ended before logging {needle!r}:\n' + ''.join(lines)[-3000:])


def _unlocked():
  c = tiny.get_config()
  c.unlock()
  return c


# -- 1. one run per workdir -----------------------------------------------------------------
@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A 60-step run (seed 0), paused at step 25 while a second run (seed 1) is started on
  the same workdir; then let to finish."""
  workdir = tmp_path_factory.mktemp('run') / 'w'
  first = subprocess.Popen(_train_cmd(workdir), cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  lines = []
  try:
    _read_until(first, '] step 25/', lines)
    _wait_for(workdir / 'checkpoints' / '20' / '_CHECKPOINT_METADATA', first)
    first.send_signal(signal.SIGSTOP)
    before = _snapshot(workdir)
    second = _run(_train_cmd(workdir, '--config.seed=1'), timeout=300)
    after = _snapshot(workdir)
    first.send_signal(signal.SIGCONT)
    lines.extend(first.stderr)
    first.wait(timeout=600)
  finally:
    if first.poll() is None:
      first.send_signal(signal.SIGCONT)
      first.kill()
  return dict(workdir=workdir, pid=first.pid, returncode=first.returncode, log=''.join(lines),
              second=second, before=before, after=after)


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_and_writes_nothing(finished):
  second = finished['second']
  assert second.returncode == errors.EXIT_USER_ERROR, second.stderr[-3000:]
  assert 'Traceback' not in second.stderr
  [line] = _error_lines(second.stderr, 'train')
  assert f'in use by process {finished["pid"]} on {socket.gethostname()} (started 20' in line
  assert str(finished['workdir']) in line
  assert finished['after'] == finished['before']       # config.json, frozen/, checkpoints/
  # The first run went on undisturbed, with its own config, and released the lock.
  assert finished['returncode'] == errors.EXIT_OK, finished['log'][-3000:]
  saved = json.loads((finished['workdir'] / 'config.json').read_text())
  assert saved['config']['seed'] == 0
  assert not (finished['workdir'] / 'LOCK').exists()
  assert _steps(finished['workdir']) == [40, 60]


@pytest.mark.slow
def test_rerunning_a_finished_run_exits_0_and_changes_no_checkpoint(finished, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(finished['workdir'], workdir)
  before = {k: v for k, v in _snapshot(workdir).items() if k.startswith(('checkpoints', 'best'))}
  out = _run(_train_cmd(workdir))
  assert out.returncode == errors.EXIT_OK, out.stderr[-3000:]
  assert f'resuming from {workdir}/checkpoints/60' in out.stderr
  assert {k: v for k, v in _snapshot(workdir).items()
          if k.startswith(('checkpoints', 'best'))} == before


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, caplog):
  lock_file = tmp_path / 'LOCK'
  dead = _dead_pid()
  lock_file.write_text(json.dumps({'host': socket.gethostname(), 'pid': dead,
                                   'started': '2020-01-01T00:00:00'}))
  with caplog.at_level('WARNING'):
    with checkpoints.WorkdirLock(str(tmp_path)):
      assert json.loads(lock_file.read_text())['pid'] == os.getpid()
  assert f'taking over the lock of process {dead}' in caplog.text
  assert not lock_file.exists()


def test_a_live_or_foreign_lock_is_refused_naming_the_holder(tmp_path):
  lock_file = tmp_path / 'LOCK'
  now = time.strftime('%Y-%m-%dT%H:%M:%S')
  for holder in ({'host': socket.gethostname(), 'pid': os.getppid()},     # alive, this host
                 {'host': 'another-host', 'pid': _dead_pid()}):         # cannot be checked
    lock_file.write_text(json.dumps({**holder, 'started': now}))
    with pytest.raises(errors.ConfigError,
                       match=rf'in use by process {holder["pid"]} on {holder["host"]} '
                       rf'\(started {now}\)'):
      checkpoints.WorkdirLock(str(tmp_path)).acquire()
    assert json.loads(lock_file.read_text())['pid'] == holder['pid']


@pytest.mark.skipif(not os.path.exists('/proc/self/stat'), reason='process start times: Linux')
def test_a_lock_whose_pid_was_reused_is_taken_over(tmp_path):
  # A run killed in a container, restarted with the same pid (or another process that
  # got the number): the pid is alive, but it is not the process that took the lock.
  lock_file = tmp_path / 'LOCK'
  for pid in (os.getpid(), os.getppid()):
    lock_file.write_text(json.dumps({'host': socket.gethostname(), 'pid': pid,
                                     'started': '2020-01-01T00:00:00'}))
    with checkpoints.WorkdirLock(str(tmp_path)):
      assert json.loads(lock_file.read_text())['pid'] == os.getpid()
  lock_file.write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                                   'started': time.strftime('%Y-%m-%dT%H:%M:%S')}))
  with checkpoints.WorkdirLock(str(tmp_path)):       # our own pid: never a holder
    pass


def test_a_workdir_that_cannot_be_created_is_one_config_error(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.ConfigError,
                     match=rf'^cannot use {tmp_path / "file" / "w"} as a workdir: '):
    checkpoints.WorkdirLock(str(tmp_path / 'file' / 'w')).acquire()


# -- 2. a non-finite update is never saved ------------------------------------------------
@pytest.mark.slow
def test_nan_before_the_first_checkpoint_stops_and_says_none_was_written(tmp_path):
  workdir = tmp_path / 'w'
  out = _run(_train_cmd(workdir, '--config.optimizer.lr=nan'))
  assert out.returncode == errors.EXIT_NONFINITE, out.stderr[-3000:]
  [line] = _error_lines(out.stderr, 'train')
  # The loss of step 1 is computed before the update: finite; the parameters are not.
  assert 'NonFiniteLoss: param_norm is nan at step 1 ' in line, line
  assert 'loss is' not in line
  assert 'none: no checkpoint was written' in line and 'step None' not in line
  assert _steps(workdir) == []
  assert 'Traceback' not in out.stderr


# -- 3. damaged steps: skipped, moved aside, named ------------------------------------------
def _damage(step_dir):
  """Truncate the array data files of a step's params (what a crash mid-copy leaves)."""
  files = [p for p in (step_dir / 'params').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[:100])


def test_reading_a_damaged_checkpoint_prints_no_late_tracebacks(tmp_path, monkeypatch):
  # A failed orbax read leaves tensorstore reads in flight; their callbacks used to print
  # an 'Event loop is closed' traceback each, around the one-line error.
  params = {'w': np.arange(4096, dtype=np.float32).reshape(64, 64), 'b': np.ones(64, np.float32)}
  checkpoints.save_params(str(tmp_path / 'ckpt'), params, {'variant': 'Ti/16'})
  files = [p for p in (tmp_path / 'ckpt' / 'params').rglob('*') if p.parent.name == 'd']
  for p in files:
    p.write_bytes(p.read_bytes()[:50])
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  for _ in range(8):
    with pytest.raises(errors.CheckpointError, match=rf'{tmp_path / "ckpt" / "params"} is damaged'):
      checkpoints.load_params(str(tmp_path / 'ckpt'))
  time.sleep(1)
  assert [str(r.exc_value) for r in reported] == []


def test_unretrieved_read_errors_of_a_failed_restore_are_not_logged():
  """Reads that fail beside the one orbax reports are tasks nobody awaits: asyncio logs each
  with a traceback when it is collected (a fresh-clone run caught three under load, after
  the one-line error). Those reports of tensorstore read errors are dropped; asyncio's
  other reports are not."""
  code = r"""
import asyncio, gc
from absl import logging
from aim_jax import checkpoints
checkpoints._quiet_late_read_callbacks()
async def fail(text):
  raise ValueError(text)
async def main():
  for text in ('OUT_OF_RANGE: Error opening "zarr" driver: Error reading "w/.zarray" in '
               'OCDBT database at local file "/c/params/"', 'an error of something else'):
    asyncio.ensure_future(fail(text))
  await asyncio.sleep(0.01)
asyncio.run(main())
gc.collect()
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=120, env=cpu_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'zarr' not in out.stderr and 'OCDBT' not in out.stderr, out.stderr
  assert out.stderr.count('Task exception was never retrieved') == 1, out.stderr
  assert 'an error of something else' in out.stderr


@pytest.fixture(scope='module')
def damaged(finished, tmp_path_factory):
  """The finished run with its newest step (60) truncated: evaluate it, then resume it
  with a diverging learning rate (recorded config change) and 10 more steps."""
  workdir = tmp_path_factory.mktemp('damaged') / 'w'
  shutil.copytree(finished['workdir'], workdir)
  _damage(workdir / 'checkpoints' / '60')
  config_json = (workdir / 'config.json').read_bytes()
  evaluated = _run([sys.executable, '-m', 'aim_jax.evaluate', '--config', 'configs/tiny.py',
                    '--checkpoint', str(workdir), '--progress=false'], timeout=600)
  resumed = _run(_train_cmd(workdir, '--config.total_steps=70', '--config.optimizer.lr=nan',
                            '--on_config_change=record'))
  return dict(workdir=workdir, evaluated=evaluated, resumed=resumed, config_json=config_json)


@pytest.mark.slow
def test_evaluate_names_the_damaged_step_in_one_line(damaged):
  out = damaged['evaluated']
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  [line] = _error_lines(out.stderr, 'evaluate')
  assert f'CheckpointError: {damaged["workdir"] / "checkpoints" / "60"}' in line, line
  assert f'earlier steps in {damaged["workdir"] / "checkpoints"}: 40;' in line, line


@pytest.mark.slow
def test_resume_skips_a_damaged_step_and_moves_it_aside(damaged):
  workdir, log = damaged['workdir'], damaged['resumed'].stderr
  assert f'checkpoint {workdir / "checkpoints" / "60"} is damaged' in log, log[-3000:]
  assert f'resuming from {workdir}/checkpoints/40' in log
  [moved] = list((workdir / 'damaged').iterdir())
  assert moved.name.startswith('checkpoints-60-')
  assert {p.name for p in moved.iterdir()} >= {'meta', 'opt_state', 'params'}   # moved whole
  assert _steps(workdir) == [40]


@pytest.mark.slow
def test_nan_after_a_resume_names_the_real_last_good_step_and_saves_nothing(damaged):
  workdir, out = damaged['workdir'], damaged['resumed']
  assert out.returncode == errors.EXIT_NONFINITE, out.stderr[-3000:]
  [line] = _error_lines(out.stderr, 'train')
  assert 'param_norm is nan at step 41 ' in line, line
  assert f'The last good checkpoint is step 40 in {workdir}/checkpoints' in line
  assert _steps(workdir) == [40]
  params, _ = checkpoints.restore_params_from_workdir(str(workdir))
  assert all(np.isfinite(v).all() for v in P.flatten(params).values())


# -- 8. the workdir's config is its identity ------------------------------------------------
@pytest.mark.slow
def test_a_recorded_config_change_leaves_config_json_as_it_was(damaged):
  workdir = damaged['workdir']
  assert (workdir / 'config.json').read_bytes() == damaged['config_json']
  [record] = [json.loads(line) for line in (workdir / 'config_changes.jsonl').open()]
  assert record['changes'] == ['optimizer.lr: 0.01 -> nan', 'total_steps: 60 -> 70']
  assert record['config']['total_steps'] == 70


def _workdir_with_run(path):
  c = _unlocked()
  c.total_steps = 60
  checkpoints.start_run(str(path), c, run_config.resolve_model(c.model), {})
  (path / 'frozen').mkdir()
  (path / 'checkpoints' / '20').mkdir(parents=True)      # a saved step: a run to resume
  return c


def test_resuming_with_another_batch_size_is_refused_naming_the_field(tmp_path):
  c = _workdir_with_run(tmp_path)
  saved = (tmp_path / 'config.json').read_bytes()
  c.batch_size = 16
  with pytest.raises(errors.ConfigError, match=r'changed: batch_size: 8 -> 16 .*'
                     r'--on_config_change=record'):
    train.train_and_evaluate(c, str(tmp_path))
  assert (tmp_path / 'config.json').read_bytes() == saved
  assert not (tmp_path / 'config_changes.jsonl').exists()
  assert not (tmp_path / 'LOCK').exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoints', 'config.json', 'frozen']


def test_a_resume_may_move_init_from_or_read_records_another_way():
  saved = {'init_from': '/ckpt/clip_b16', 'data': {'frame_index': 'auto', 'sampling': 'dense'}}
  moved = {'init_from': 'gs://b/clip_b16', 'data': {'frame_index': 'off', 'sampling': 'dense'}}
  assert checkpoints.config_changes(saved, moved) == []
  moved['data']['sampling'] = 'uniform'                  # this one changes the clips
  assert checkpoints.config_changes(saved, moved) == ["data.sampling: 'dense' -> 'uniform'"]


def test_a_start_that_saved_no_step_does_not_bind_the_workdir_to_its_config(tmp_path, caplog):
  # A first start that failed before its first checkpoint (a bad init_from, a field only the
  # model's init refuses) wrote config.json and frozen/: the corrected command is not refused.
  c = _unlocked()
  model_cfg = run_config.resolve_model(c.model)
  checkpoints.start_run(str(tmp_path), c, model_cfg, {})
  (tmp_path / 'frozen').mkdir()
  (tmp_path / 'checkpoints' / '20.orbax-checkpoint-tmp-1').mkdir(parents=True)  # unfinished
  c.batch_size = 16
  with caplog.at_level('WARNING'):
    checkpoints.start_run(str(tmp_path), c, model_cfg, {})
  assert 'config.json is from a start that saved no step' in caplog.text
  assert json.loads((tmp_path / 'config.json').read_text())['config']['batch_size'] == 16
  assert checkpoints.saved_steps(str(tmp_path)) == []


def test_saved_steps_without_config_json_are_refused_and_left_alone(tmp_path):
  c = _workdir_with_run(tmp_path)
  (tmp_path / 'best' / '20').mkdir(parents=True)
  (tmp_path / 'config.json').unlink()
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  with pytest.raises(errors.ConfigError, match=r'holds saved steps .* but no config.json'):
    train.train_and_evaluate(c, str(tmp_path))
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before      # no LOCK, no damaged/


def test_a_damaged_config_json_is_named(tmp_path):
  c = _workdir_with_run(tmp_path)
  (tmp_path / 'config.json').write_text('{"model": {"backbone": "clip"')
  with pytest.raises(errors.ConfigError, match=rf'{tmp_path / "config.json"} is damaged'):
    checkpoints.start_run(str(tmp_path), c, run_config.resolve_model(c.model), {})


def test_an_unreadable_lock_is_refused_when_fresh_and_taken_over_when_old(tmp_path, caplog):
  lock_file = tmp_path / 'LOCK'
  for text in ('', 'not json'):
    lock_file.write_text(text)
    with pytest.raises(errors.ConfigError, match=rf'its lock {lock_file} is unreadable .*'
                                                 'delete the file'):
      checkpoints.WorkdirLock(str(tmp_path)).acquire()
    assert lock_file.read_text() == text
  old = time.time() - 120
  os.utime(lock_file, (old, old))
  with caplog.at_level('WARNING'):
    with checkpoints.WorkdirLock(str(tmp_path)):
      assert json.loads(lock_file.read_text())['pid'] == os.getpid()
  assert f'taking over the unreadable lock {lock_file}' in caplog.text


def test_a_recorded_batch_size_change_is_appended_to_config_changes(tmp_path):
  c = _workdir_with_run(tmp_path)
  saved = (tmp_path / 'config.json').read_bytes()
  model_cfg = run_config.resolve_model(c.model)
  c.log_every_steps, c.checkpoint.keep = 1, 7          # runtime fields: no record needed
  checkpoints.start_run(str(tmp_path), c, model_cfg, {})
  assert not (tmp_path / 'config_changes.jsonl').exists()
  c.batch_size = 16
  checkpoints.start_run(str(tmp_path), c, model_cfg, {}, on_config_change='record')
  c.batch_size = 32
  checkpoints.start_run(str(tmp_path), c, model_cfg, {}, on_config_change='record')
  records = [json.loads(line) for line in (tmp_path / 'config_changes.jsonl').open()]
  assert [r['changes'] for r in records] == [['batch_size: 8 -> 16'], ['batch_size: 8 -> 32']]
  assert records[1]['config']['batch_size'] == 32
  assert (tmp_path / 'config.json').read_bytes() == saved


# -- 4. a workdir that cannot be written stops the run at once --------------------------------
@pytest.mark.slow
def test_an_unwritable_checkpoint_dir_stops_the_run_at_once(tmp_path):
  # Tests run as root, for whom permission bits do not block writes: the checkpoints/
  # directory is replaced by a regular file, which refuses writes for everyone.
  # Saves are synchronous here, so the run is stopped between the saves of steps 20 and
  # 40 and meets the replaced directory at the next one (the background case: below).
  workdir = tmp_path / 'w'
  proc = subprocess.Popen(_train_cmd(workdir, '--config.checkpoint.async_save=False'), cwd=ROOT,
                          env=cpu_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  lines = []
  try:
    _wait_for(workdir / 'checkpoints' / '20', proc)
    proc.send_signal(signal.SIGSTOP)
    (workdir / 'checkpoints').rename(workdir / 'kept')
    (workdir / 'checkpoints').write_text('not a directory')
    start = time.time()
    proc.send_signal(signal.SIGCONT)
    lines.extend(proc.stderr)
    proc.wait(timeout=300)
    elapsed = time.time() - start
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGCONT)
      proc.kill()
  log = ''.join(lines)
  assert proc.returncode == errors.EXIT_USER_ERROR, log[-3000:]
  assert 'Traceback' not in log
  [line] = _error_lines(log, 'train')
  assert f'SaveFailed: cannot write checkpoints to {workdir / "checkpoints"}: ' in line, line
  assert 'File exists' in line or 'Not a directory' in line, line
  assert '] step 45/' not in log           # stopped at the save of step 40
  assert not list(workdir.glob('kept/4*'))
  assert elapsed < 120, elapsed
  (workdir / 'checkpoints').unlink()
  (workdir / 'kept').rename(workdir / 'checkpoints')
  assert _steps(workdir) == [20]
  params, _, kind = checkpoints.load_checkpoint(str(workdir))
  assert kind == 'workdir' and all(np.isfinite(v).all() for v in P.flatten(params).values())


def test_a_failed_background_save_is_a_save_failed_error_not_a_raw_one(tmp_path, monkeypatch):
  # A write that fails after the directory probe (disk full, a directory vanishing during
  # an asynchronous save): the error surfaces at the next save or wait, as SaveFailed.
  ckpt = checkpoints.TrainCheckpointer(str(tmp_path), keep=2, async_save=True, keep_best=False)
  params = {'w': np.ones((64, 64), np.float32)}
  opt_state = ({'mu': np.zeros((64, 64), np.float32)},)
  ckpt.save(1, params, opt_state, {'step': 1})
  ckpt.wait()
  monkeypatch.setattr(ckpt, '_probe', lambda directory: None)
  (tmp_path / 'checkpoints').rename(tmp_path / 'kept')
  (tmp_path / 'checkpoints').write_text('not a directory')
  with pytest.raises(checkpoints.SaveFailed, match=rf'{tmp_path}.*Not a directory'):
    ckpt.save(2, params, opt_state, {'step': 2})
    ckpt.wait()
  ckpt.close(quiet=True)
  (tmp_path / 'checkpoints').unlink()
  (tmp_path / 'kept').rename(tmp_path / 'checkpoints')
  assert _steps(tmp_path) == [1]


# -- 5. a workdir exports like a parameter checkpoint -----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('which', ['latest', 'best'])
def test_workdir_export_aim_then_convert_aim_gives_the_same_logits(finished, tmp_path, which):
  pytest.importorskip('torch')        # the official format is a torch .pth
  workdir = str(finished['workdir'])
  params, cfg = checkpoints.restore_params_from_workdir(workdir, which)
  pth = tmp_path / 'out' / 'model.pth'
  assert convert_cli.main(['export-aim', '--src', workdir, '--out', str(pth),
                           '--which', which]) == 0
  assert convert_cli.main(['aim', '--src', str(pth), '--out', str(tmp_path / 'conv'),
                           '--heads', str(cfg['heads']),
                           '--adapter-scale', str(cfg['adapters']['scale'])]) == 0
  converted, conv_cfg, _ = checkpoints.load_params(str(tmp_path / 'conv'), like=params)
  assert set(P.flatten(converted)) == set(P.flatten(params))
  t, s = cfg['num_frames'], cfg['image_size']
  video = np.random.RandomState(0).rand(2, t, s, s, 3).astype(np.float32)
  expected = build_model(cfg).apply({'params': params}, video)
  got = build_model(run_config.resolve_model(conv_cfg)).apply({'params': converted}, video)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.slow
def test_workdir_export_params_writes_a_plain_parameter_checkpoint(finished, tmp_path):
  workdir = str(finished['workdir'])
  out = tmp_path / 'params_best'
  assert convert_cli.main(['export-params', '--src', workdir, '--out', str(out),
                           '--which', 'best']) == 0
  assert checkpoints.is_params_checkpoint(str(out))
  assert not (out / 'checkpoints').exists() and not (out / 'frozen').exists()
  params, cfg, metadata = checkpoints.load_params(str(out))
  ref, ref_cfg = checkpoints.restore_params_from_workdir(workdir, 'best')
  assert metadata['which'] == 'best' and metadata['source_kind'] == 'workdir'
  assert run_config.resolve_model(cfg) == run_config.resolve_model(ref_cfg)
  flat = P.flatten(params)
  for name, value in P.flatten(ref).items():
    np.testing.assert_array_equal(flat[name], value, err_msg=name)
  # ... and it is what init_from reads: every leaf taken.
  _, at_init = checkpoints.load_init_from(str(out), jax.tree.map(np.zeros_like, ref), cfg)
  assert at_init == []


def test_export_of_a_directory_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
  for command in ('export-aim', 'export-params'):
    assert convert_cli.main([command, '--src', str(tmp_path), '--out',
                             str(tmp_path / 'x')]) == errors.EXIT_USER_ERROR
    [line] = _error_lines(capsys.readouterr().err, 'convert')
    assert f'CheckpointError: {tmp_path} is neither a parameter checkpoint' in line


# -- 7. a config that cannot run fails before compiling ------------------------------------------
@pytest.mark.parametrize('field,value', [('checkpoint.every_steps', 0), ('log_every_steps', 0),
                                         ('total_steps', -5), ('checkpoint.keep', 0)])
def test_a_field_that_cannot_run_is_named_before_anything_is_written(tmp_path, field, value):
  c = _unlocked()
  *parents, name = field.split('.')
  holder = c
  for part in parents:
    holder = holder[part]
  holder[name] = value
  with pytest.raises(errors.ConfigError, match=rf'^{field}={value} must be'):
    train.train_and_evaluate(c, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('field,value,message', [
    ('model.width', 0, 'model.width=0 must be a positive integer'),
    ('model.num_frames', 0, 'model.num_frames=0 must be a positive integer'),
    ('model.layers', 0, 'model.layers=0 must be a positive integer'),
    ('model.patch_size', 7, 'model.image_size=32 must be a multiple of model.patch_size=7'),
    ('model.mlp_ratio', 0.0, 'model.mlp_ratio=0.0 must be > 0'),
    ('model.drop_path_rate', 2.0, 'model.drop_path_rate=2.0 must be in [0, 1)'),
    ('model.adapters.ratio', -1.0, 'model.adapters.ratio=-1.0 must be > 0'),
    ('model.adapters.scale', float('nan'), 'model.adapters.scale=nan must be a finite number'),
    ('model.adapters.num_tadapter', 3, 'model.adapters.num_tadapter=3 must be 1 or 2'),
    ('model.mlp_ratio', float('inf'), 'model.mlp_ratio=inf must be > 0'),
    ('model.backbone', 'resnet', "model.backbone 'resnet' is not one of"),
    ('optimizer.lr', -1.0, 'optimizer.lr=-1.0 must be >= 0'),
    ('optimizer.name', 'sgd', "optimizer.name='sgd' is not supported"),
    ('optimizer.b2', 1.0, 'optimizer.b2=1.0 must be in [0, 1)'),
    ('data.source', 'nothing', "data.source='nothing' must be one of 'tfrecord', 'tfds'"),
    ('data.sampling', 'weird', "data.sampling='weird' must be one of 'dense', 'uniform'"),
    ('data.frame_index', 'maybe', "data.frame_index='maybe' must be one of 'auto'"),
    ('data.frame_interval', 0, 'data.frame_interval=0 must be a positive integer'),
    ('data.train_fraction', 2.0, 'data.train_fraction=2.0 must be in (0, 1]'),
    ('data.area_range', (1.0,), 'data.area_range=(1.0,) must be (low, high)'),
    ('data.mean', (1.0, 2.0), 'data.mean=(1.0, 2.0) must be three numbers'),
    ('data.test_clips', 0, 'data.test_clips=0 must be a positive integer'),
    ('eval.split', 'train2', "eval.split='train2' must be 'val' or 'test'"),
    ('mesh.model', 3, 'devices are not divisible by the fixed axes'),
    ('mesh.data', 0, 'each of mesh.data/fsdp/model must be a positive integer or -1'),
])
def test_a_value_out_of_range_is_named_before_anything_is_written(tmp_path, field, value,
                                                                  message):
  c = _unlocked()
  *parents, name = field.split('.')
  holder = c
  for part in parents:
    holder = holder[part]
  holder[name] = value
  with pytest.raises(errors.ConfigError) as raised:
    train.train_and_evaluate(c, str(tmp_path / 'w'))
  assert message in str(raised.value), str(raised.value)
  assert not (tmp_path / 'w').exists()


# -- 9. every command: a user error is one line and a non-zero exit ------------------------------
CLI_ERRORS = [
    ('train', ['--config.total_steps=-5'], 'ConfigError: total_steps=-5 must be >= 0'),
    ('train', ['--config.checkpoint.every_steps=0'],
     'ConfigError: checkpoint.every_steps=0 must be a positive integer'),
    ('train', ['--config.log_every_steps=0'], 'log_every_steps=0 must be a positive integer'),
    ('train', ['--config.optimizer.nope=1'],
     '--config.optimizer.nope=1: the config (configs/tiny.py) has no field optimizer.nope'),
    ('train', ['--config.batch_size=eight'], 'flag --config.batch_size=eight: invalid literal'),
    ('train', ['--config.model.width=0'], 'ConfigError: model.width=0 must be a positive integer'),
    ('train', ['extra'], "ConfigError: unexpected arguments ['extra']: every option is a --flag"),
    ('train', ['--config.mesh.model=3'], 'ConfigError: mesh: 1 devices are not divisible'),
    ('convert', ['aim', '--src', '{tmp}/none.pth', '--out', '{tmp}/o'], '{tmp}/none.pth'),
    ('convert', ['export-aim', '--src', '{tmp}', '--out', '{tmp}/o.pth'],
     'CheckpointError: {tmp} is neither'),
    # The video is checked first (before a checkpoint is loaded): the missing file is named.
    ('predict', ['--checkpoint', '{tmp}/none', '--video', 'x.mp4'],
     'DataError: video file x.mp4 does not exist'),
    ('predict', ['--checkpoint', '{tmp}/none', '--video', 'x.mp4', 'extra'],
     "ConfigError: unexpected arguments ['extra']: every option is a --flag"),
    pytest.param('evaluate', ['--config', 'configs/tiny.py', '--checkpoint', '{tmp}/none'],
                 'CheckpointError: checkpoint directory {tmp}/none does not exist',
                 marks=pytest.mark.slow),        # imports TensorFlow: ~25 s on 2 cores
]


def _cli(prog, args, tmp_path):
  args = [a.replace('{tmp}', str(tmp_path)) for a in args]
  if prog == 'train':
    return [sys.executable, '-m', 'aim_jax.train', '--config', 'configs/tiny.py',
            '--workdir', str(tmp_path / 'w'), *args]
  return [sys.executable, '-m', f'aim_jax.{prog}', *args]


@pytest.mark.parametrize('prog,args,message', CLI_ERRORS)
def test_a_user_error_is_one_line_and_exit_2(tmp_path, prog, args, message):
  out = _run(_cli(prog, args, tmp_path), timeout=300)
  assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  [line] = _error_lines(out.stderr, prog)
  assert message.replace('{tmp}', str(tmp_path)) in line, line
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('prog,args', [('train', ['--config.total_steps=-5']),
                                       ('train', ['--config.optimizer.nope=1']),
                                       ('convert', ['export-aim', '--src', '{tmp}', '--out', 'x'])])
def test_aim_jax_traceback_shows_the_traceback(tmp_path, prog, args):
  out = _run(_cli(prog, args, tmp_path), timeout=300, AIM_JAX_TRACEBACK='1')
  assert out.returncode != 0
  assert 'Traceback (most recent call last)' in out.stderr


@pytest.mark.parametrize('config_arg,message', [
    ('configs/nope.py', 'config file configs/nope.py does not exist'),
    ('{tmp}/dict_config.py', 'ConfigError: get_config() of {tmp}/dict_config.py returned a dict, '
     'not an ml_collections.ConfigDict'),
    ('configs/tiny.py:bogus=1', "config argument 'bogus' is not one of ['frames', 'steps']"),
    ('configs/tiny.py:frames=x', "ValueError: invalid literal for int() with base 10: 'x'"),
])
def test_a_bad_config_file_or_argument_is_one_line(tmp_path, config_arg, message):
  (tmp_path / 'dict_config.py').write_text("def get_config():\n  return {'batch_size': 8}\n")
  config_arg, message = (s.replace('{tmp}', str(tmp_path)) for s in (config_arg, message))
  out = _run([sys.executable, '-m', 'aim_jax.train', '--config', config_arg,
              '--workdir', str(tmp_path / 'w')], timeout=300)
  assert out.returncode == errors.EXIT_USER_ERROR and 'Traceback' not in out.stderr
  [line] = _error_lines(out.stderr, 'train')
  assert config_arg in line and message in line, line
