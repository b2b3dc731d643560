"""Times the jitted train and eval steps on whatever devices are present.

  python -m benchmarks.step_benchmark --config configs/k400.py:b16_f8 --mode train --batch 64
  python -m benchmarks.step_benchmark --config configs/tiny.py --mode both --steps 20

Synthetic input is placed on the devices once (sharded over the data axis), so
the figures are the model's, not the input pipeline's; `--data real` feeds the
config's tf.data pipeline instead (host decode included). Each step is
synchronised with `block_until_ready` on its outputs. Reported: clips/s, step
time (median, p10-p90), compile time, peak device memory, the analytic MACs
per clip (`aim_jax.flops`: the paper's GFLOPs are multiply-adds) and MFU =
2 * MACs * clips/s / (devices * peak bf16 FLOP/s). `--find-max-batch` doubles
the batch until compilation or execution runs out of memory (with and without
remat). `--profile DIR` traces a few more steps with the JAX profiler and
reports where the device time goes, by kernel family (`benchmarks.profile_kernels`).
Nothing here needs tensorflow unless `--data real`.

`--official DIR` also times the official PyTorch AIM (its own files under DIR,
loaded by `benchmarks.official_torch`) on the same device, per-device batch and
precision, with our weights: as released (eager) and modernised (torch.compile,
fused AdamW), `--official_modes`; it reports ours / each official row's clips/s
per mode.

A missing or broken config file, an unknown `--config.FIELD`, a config field or flag out of
its range, an unknown `--remat` policy and an `--out` whose folder cannot be made or written
end the command with one line and exit status 2 (`aim_jax.errors`) before anything is built;
`AIM_JAX_TRACEBACK=1` shows the traceback.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
from typing import Any

from absl import app, flags

from aim_jax import errors

FLAGS = flags.FLAGS


class FlagError(errors.UserError):
  """A flag this config cannot take, or an --out that cannot be written; names the flag."""


# Dense bf16 peak per device, FLOP/s (vendor datasheets).
PEAK_BF16 = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def device_peak(device) -> float | None:
  kind = getattr(device, 'device_kind', '')
  for name, peak in PEAK_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


def peak_memory_bytes(devices) -> int | None:
  """Peak bytes in use on the first device, or the process's max RSS on CPU."""
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  if devices[0].platform == 'cpu':
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  return None


def program_memory_bytes(compiled) -> int | None:
  """The device memory one compiled step needs (XLA's buffer assignment: arguments,
  outputs not aliased to donated arguments, and temporaries), known before it runs.
  Unlike `peak_memory_bytes` (the process's high-water mark), it belongs to this step."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # a backend without the analysis
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
             m.temp_size_in_bytes)


def _percentiles(times):
  import numpy as np
  t = np.asarray(times)
  return float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90))


def _typed(field: str, old: Any, text: str) -> Any:
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{field} takes true or false, got {text!r}')
    return text.lower() in ('true', '1')
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    try:
      return type(old)(text)
    except ValueError:
      raise ValueError(f'{field} takes {type(old).__name__}, got {text!r}') from None
  return text


def parse_variant(spec: str, config: Any) -> tuple[str, Any]:
  """`NAME:FIELD=VALUE[,FIELD=VALUE...]` -> (NAME, a copy of `config` with those fields set).

  FIELD is a config path (`model.attention_impl`), VALUE is read with the type the
  field has (bool, int, float, str). Raises ValueError naming the spec and field."""
  import copy

  from ml_collections.config_flags import config_path
  name, sep, body = spec.partition(':')
  if not sep or not name or not body or not re.fullmatch(r'[\w.\-]+', name):
    raise ValueError(f'--variant {spec!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE...]')
  cfg = copy.deepcopy(config)
  for item in body.split(','):
    field, eq, text = item.partition('=')
    if not eq:
      raise ValueError(f'--variant {spec!r}: {item!r} is not FIELD=VALUE')
    try:
      old = config_path.get_value(field, cfg)
    except (AttributeError, KeyError, IndexError, ValueError):
      raise ValueError(f'--variant {spec!r}: the config has no field {field}') from None
    try:
      config_path.set_value(field, cfg, _typed(field, old, text))
    except ValueError as e:
      raise ValueError(f'--variant {spec!r}: {e}') from None
  return name, cfg


def parse_variants(specs: list[str], config: Any) -> list[tuple[str, Any, str]]:
  """(name, config, spec) for the default and each `--variant` spec, every variant's
  model and data config checked: a bad spec, field, value or repeated name raises ValueError
  (one line) before anything is built."""
  from aim_jax import run_config
  from data_pipelines import config as data_config
  variants = [('default', config, '')]
  for spec in specs:
    name, cfg = parse_variant(spec, config)
    try:
      run_config.resolve_model(cfg.model)
      data_config.check(cfg.data)
    except errors.ConfigError as e:
      raise ValueError(f'--variant {spec!r}: {e}') from None
    variants.append((name, cfg, spec))
  if len({name for name, _, _ in variants}) != len(variants):
    raise ValueError('--variant: every variant needs its own NAME (and not "default")')
  return variants


def order_rows(modes: list[str], variants: list[tuple[str, Any, str]],
               late: set[str]) -> list[tuple[str, tuple[str, Any, str]]]:
  """(mode, variant) in the order they are timed: mode by mode, each in --variant order,
  except that the variants named in `late` (--after_official) come after all the others."""
  rows = [(mode, v) for mode in modes for v in variants]
  return [r for r in rows if r[1][0] not in late] + [r for r in rows if r[1][0] in late]


def build(config: Any, batch: int, mode: str, remat: str | None = None):
  """Sharded state and jitted step functions for `config` at global batch `batch`,
  built exactly as training builds them (`aim_jax.train_state`)."""
  import jax
  import jax.numpy as jnp

  from aim_jax import run_config, sharding, train_state

  model_cfg = run_config.resolve_model(config.model)
  if remat is not None:
    model_cfg['remat_policy'] = remat
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh)
  if batch % dp:
    raise ValueError(f'--batch {batch} is not divisible by the data-parallel size {dp}')
  setup = train_state.create_train_state(config, mesh, model_cfg=model_cfg)
  params = train_state.init_params(setup)
  t, s = model_cfg['num_frames'], model_cfg['image_size']
  video = jax.jit(lambda r: jax.random.normal(r, (batch, t, s, s, 3), jnp.float32),
                  out_shardings=sharding.batch_sharding(mesh, 5))(jax.random.key(1))
  labels = jax.device_put(jnp.arange(batch, dtype=jnp.int32) % model_cfg['num_classes'],
                          sharding.batch_sharding(mesh, 1))
  out = dict(model_cfg=model_cfg, mesh=mesh, rules=setup.rules, params=params, video=video,
             labels=labels, abstract=setup.abstract_params,
             attention=train_state.attention_fields(setup))
  if mode == 'train':
    out['step'] = train_state.train_step_fn(setup)
    out['state'] = train_state.state_from_params(setup, params)
  else:
    out['step'] = train_state.eval_logits_fn(setup)
  return out


def time_steps(config: Any, batch: int, mode: str, steps_n: int, warmup: int,
               remat: str | None = None, data_iter=None, profile_dir: str | None = None,
               profile_steps: int = 3) -> dict:
  """Compile, warm up, then time `steps_n` synchronised steps.

  The steps are traced under the global mesh and the logical rules
  (`sharding.mesh_context`): the model's activation constraints are in the
  compiled program, as in training. With `profile_dir`, `profile_steps` more
  steps then run under the JAX profiler (trace in `profile_dir/MODE`) and
  `r['profile']` holds their kernel time by family (`profile_kernels`), or its `error` when
  the profiler fails: the timed figures are kept.
  """
  import jax

  from aim_jax import flops, sharding

  b = build(config, batch, mode, remat)
  mesh = b['mesh']

  def next_batch():
    if data_iter is None:
      return b['video'], b['labels']
    host = next(data_iter)
    return (sharding.put_global(host['video'], sharding.batch_sharding(mesh, 5),
                                (batch,) + host['video'].shape[1:]),
            sharding.put_global(host['label'], sharding.batch_sharding(mesh, 1), (batch,)))

  with sharding.mesh_context(mesh, b['rules']):
    video, labels = next_batch()
    t0 = time.perf_counter()
    if mode == 'train':
      compiled = b['step'].lower(b['state'], {'video': video, 'label': labels}).compile()
    else:
      compiled = b['step'].lower(b['params'], video).compile()
    compile_s = time.perf_counter() - t0
    # Logged now: a run cut by a time limit during its steps still tells its compile time.
    print(f'{mode}: compiled in {compile_s:.1f} s', flush=True)
    program_bytes = program_memory_bytes(compiled)
    state = b.get('state')

    def one_step():
      nonlocal state
      video, labels = next_batch()
      if mode == 'train':
        state, metrics = compiled(state, {'video': video, 'label': labels})
        jax.block_until_ready((state['step'], metrics))
      else:
        jax.block_until_ready(compiled(b['params'], video))

    times = []
    for i in range(warmup + steps_n):
      t0 = time.perf_counter()
      one_step()
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    profile = None
    if profile_dir:
      try:
        profile = trace_steps(one_step, os.path.join(profile_dir, mode), profile_steps)
      except Exception as e:  # noqa: BLE001  a profiler that fails (no CUPTI access, no
        # trace written) costs the row its profile, not the figures timed above
        traceback.print_exc()
        profile = dict(error=f'{type(e).__name__}: {e}'[:1000])
  med, p10, p90 = _percentiles(times)
  devices = jax.devices()
  macs = flops.train_macs(b['model_cfg'], config.full_finetune) if mode == 'train' else \
      flops.forward_macs(b['model_cfg'])
  clips_s = batch / med
  peak = device_peak(devices[0])
  return dict(
      mode=mode, batch=batch, remat=b['model_cfg']['remat_policy'],
      dtype=b['model_cfg']['dtype'], frames=b['model_cfg']['num_frames'],
      attention=b['attention'], devices=len(devices), device_kind=devices[0].device_kind,
      clips_per_s=clips_s, step_s_median=med, step_s_p10=p10, step_s_p90=p90,
      compile_s=compile_s, peak_memory_bytes=peak_memory_bytes(devices),
      program_memory_bytes=program_bytes,
      gmacs_per_clip=macs / 1e9,
      mfu=(2 * macs * clips_s / (len(devices) * peak)) if peak else None, steps=steps_n,
      **({'profile': profile} if profile is not None else {}))


def trace_steps(one_step, trace_dir: str, steps_n: int) -> dict:
  """Run `steps_n` synchronised steps under the JAX profiler; their kernel time by family.

  The full per-kernel table also goes to `trace_dir/kernels.json`, beside the trace.
  """
  import jax

  from benchmarks import profile_kernels

  os.makedirs(trace_dir, exist_ok=True)
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps_n):
      one_step()
  wall = time.perf_counter() - t0
  summary = profile_kernels.summarize_trace(trace_dir, steps_n, wall)
  with open(os.path.join(trace_dir, 'kernels.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  summary.pop('kernels_ms_per_step')      # the JSON of the run keeps the top kernels only
  return summary


def find_max_batch(config: Any, mode: str, start: int, remat: str | None, limit: int) -> int:
  """Largest power-of-two multiple of `start` that compiles and runs (0 if none)."""
  best, batch = 0, start
  while batch <= limit:
    try:
      time_steps(config, batch, mode, steps_n=1, warmup=0, remat=remat)
    except Exception as e:  # XLA reports OOM as RESOURCE_EXHAUSTED / XlaRuntimeError
      if 'RESOURCE_EXHAUSTED' in str(e) or 'memory' in str(e).lower():
        break
      raise
    best, batch = batch, batch * 2
  return best


def versions() -> dict:
  import flax
  import jax
  import optax
  return dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, platform=platform.platform())


def format_row(r: dict) -> str:
  variant = '' if r.get('variant', 'default') == 'default' else f' [{r["variant"]}]'
  if 'error' in r:
    return f'| {r["mode"]}{variant} | {r["error"].splitlines()[0][:100]} |' + ' |' * 9
  mem = f'{r["peak_memory_bytes"] / 2**30:.1f}' if r['peak_memory_bytes'] else 'n/a'
  mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else 'n/a'
  return (f'| {r["mode"]}{variant} | {r["frames"]} | {r["batch"]} | {r["dtype"]} | {r["remat"]} | '
          f'{r["clips_per_s"]:.2f} | {1e3 * r["step_s_median"]:.1f} '
          f'({1e3 * r["step_s_p10"]:.1f}-{1e3 * r["step_s_p90"]:.1f}) | {r["compile_s"]:.1f} | '
          f'{mem} | {r["gmacs_per_clip"]:.1f} | {mfu} |')


def check_config(config: Any, batch: int, remat: str) -> None:
  """The config's own checks (model and data fields), the batch it gives (`batch` 0: its
  batch_size) and the `--remat` policy: a ConfigError or FlagError naming the field or flag,
  before anything is built."""
  from aim_jax import run_config
  from data_pipelines import config as data_config
  model_cfg = run_config.resolve_model(config.model)
  data_config.check(config.data)
  if not batch:
    b = config.batch_size
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
      raise errors.ConfigError(f'batch_size={b!r} must be a positive integer (--batch 0 takes '
                               'the config\'s batch_size; or pass --batch N)')
  if remat:
    try:
      run_config.resolve_model({**model_cfg, 'remat_policy': remat})
    except errors.ConfigError as e:
      raise FlagError(f'--remat {remat}: {e}') from None


def check_out(path: str) -> None:
  """`--out`'s folder exists (made if it does not) and takes a new file, before anything is
  timed: a results file that cannot be written is a FlagError now, not after the run."""
  if not path:
    return
  if os.path.isdir(path):
    raise FlagError(f'--out {path}: is a folder; name the JSON file to write')
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.step_benchmark_'):
      pass
  except OSError as e:
    raise FlagError(f'--out {path}: cannot write in its folder {folder}: '
                    f'{errors.first_line(e)}') from None
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise FlagError(f'--out {path}: the file exists and is not writable')


HEADER = ('| mode | frames | batch | dtype | remat | clips/s | step ms median (p10-p90) | '
          'compile s | peak GiB | GMACs/clip | MFU |\n' + '|---' * 11 + '|')


def main(argv):
  """A user error (config, flag, --out, data) ends the command in one line, exit status 2."""
  try:
    benchmark(argv)
  except errors.UserError as e:
    if errors.show_traceback():
      raise
    raise SystemExit(errors.report(e, 'step_benchmark')) from None


def benchmark(argv):
  del argv   # a stray argument is refused by run_config.flags_parser
  if FLAGS.official:
    # The official torch model shares the GPU: JAX must not take 75% of it up front.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  config = FLAGS.config
  check_config(config, FLAGS.batch, FLAGS.remat)
  batch = FLAGS.batch or config.batch_size
  modes = ['train', 'eval'] if FLAGS.mode == 'both' else [FLAGS.mode]
  results, official_rows = [], []
  try:
    variants = parse_variants(FLAGS.variant, config)
    if 'default' in FLAGS.after_official:
      raise ValueError("--after_official: the 'default' row is ours to compare; name "
                       '--variant rows only')
  except ValueError as e:   # one line, before anything runs
    if errors.show_traceback():
      raise
    print(f'step_benchmark: {e}', file=sys.stderr, flush=True)
    raise SystemExit(errors.EXIT_USER_ERROR) from None
  check_out(FLAGS.out)
  from aim_jax import distributed
  distributed.maybe_initialize()

  def write_out(extra: dict, complete: bool) -> None:
    # Written after every stage, so a run stopped by a time limit keeps what it measured.
    if FLAGS.out:
      with open(FLAGS.out, 'w') as f:
        json.dump({'results': results, **extra, 'complete': complete, 'versions': versions(),
                   'argv': sys.argv, 'date': time.strftime('%Y-%m-%d')}, f, indent=1)

  def official_row(row: dict) -> None:
    official_rows.append(row)
    print(json.dumps({'official_row': row}), flush=True)
    write_out({'official_rows_so_far': official_rows}, complete=False)

  official_run = None

  def run_official():
    from benchmarks import official_torch
    return official_torch.run_official(
        config, batch, modes, FLAGS.official, FLAGS.steps, FLAGS.warmup,
        official_modes=[m for m in FLAGS.official_modes.split(',') if m],
        compile_backend=FLAGS.official_compile_backend, on_row=official_row)

  if FLAGS.official and FLAGS.official_first:
    official_run = run_official()
  late = {v for v in FLAGS.after_official if v}
  unknown = late - {name for name, _, _ in variants}
  if unknown:
    print(f'--after_official: no --variant named {", ".join(sorted(unknown))}; ignored',
          flush=True)

  def so_far() -> dict:
    if official_run is not None:   # the side by side so far, ratios included
      from benchmarks import official_torch
      return official_torch.compare(results, official_run)
    return {'official_rows_so_far': official_rows} if official_rows else {}

  data_iter = None
  for mode, (name, cfg, spec) in order_rows(modes, variants, late):
    if name in late and FLAGS.official and official_run is None:
      # The side by side is measured, and written, before a row that may take the process
      # down (a kernel never run on this device: a hang, or a CUDA error that poisons it).
      official_run = run_official()
      write_out(so_far(), complete=False)
    if FLAGS.data == 'real':
      from data_pipelines import input_pipeline
      import jax
      data_iter = iter(input_pipeline.make_train_dataset(
          cfg.data, batch_size=batch // jax.process_count(), seed=0))
    profile_dir = FLAGS.profile or None
    if profile_dir and name != 'default':
      profile_dir = os.path.join(profile_dir, name)
    try:
      r = time_steps(cfg, batch, mode, FLAGS.steps, FLAGS.warmup,
                     remat=FLAGS.remat or None, data_iter=data_iter,
                     profile_dir=profile_dir, profile_steps=FLAGS.profile_steps)
    except Exception as e:  # noqa: BLE001  a row that fails (a kernel the GPU lacks) keeps
      # its error, and the other rows and the official ones still run; a failed default row
      # makes the exit status 1 once they have.
      traceback.print_exc()
      r = dict(mode=mode, error=f'{type(e).__name__}: {e}'[:2000])
      print(f'variant {name} ({mode}) failed: {r["error"].splitlines()[0][:300]}', flush=True)
    r['variant'] = name
    if spec:
      r['overrides'] = spec
    r['data'] = FLAGS.data
    if FLAGS.find_max_batch and 'error' not in r:
      r['max_batch_no_remat'] = find_max_batch(cfg, mode, batch, 'none', FLAGS.max_batch_limit)
      r['max_batch_remat'] = find_max_batch(cfg, mode, batch, 'full', FLAGS.max_batch_limit)
    results.append(r)
    print(json.dumps(r, indent=1), flush=True)
    write_out(so_far(), complete=False)
  print(HEADER)
  for r in results:
    print(format_row(r))
  for r in results:
    if 'profile' in r and 'error' not in r['profile']:
      from benchmarks import profile_kernels
      label = r['mode'] if r['variant'] == 'default' else f"{r['mode']} [{r['variant']}]"
      print(profile_kernels.format_summary(label, r['profile']))
  if FLAGS.official and official_run is None:
    official_run = run_official()
  compared = so_far()
  if official_run is not None:
    from benchmarks import official_torch
    print(json.dumps(compared['official_info'], indent=1))
    print(official_torch.format_side_by_side(results, compared))
  write_out(compared, complete=True)
  failed = [r for r in results if r['variant'] == 'default' and 'error' in r]
  if failed:
    print('step_benchmark: our default row failed: '
          + '; '.join(f"{r['mode']}: {r['error'].splitlines()[0][:200]}" for r in failed),
          file=sys.stderr, flush=True)
    raise SystemExit(1)


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'config file (configs/NAME.py[:ARG])',
                                  lock_config=True)
  flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'both'], 'which step to time')
  flags.DEFINE_integer('batch', 0, 'global batch (0: the config\'s batch_size)', lower_bound=0)
  flags.DEFINE_integer('steps', 10, 'timed steps after warm-up', lower_bound=1)
  flags.DEFINE_integer('warmup', 2, 'untimed steps after compilation', lower_bound=0)
  flags.DEFINE_string('remat', '', "override model.remat_policy ('none', 'full', ...)")
  flags.DEFINE_enum('data', 'synthetic', ['synthetic', 'real'],
                    'synthetic on-device clips, or the config\'s tf.data pipeline')
  flags.DEFINE_bool('find_max_batch', False, 'also search the largest batch (with/without remat)')
  flags.DEFINE_integer('max_batch_limit', 4096, 'stop the max-batch search here', lower_bound=1)
  flags.DEFINE_string('out', '', 'write the results as JSON here (its folder is made if '
                      'missing, before anything runs)')
  flags.DEFINE_string('official', '', 'folder holding the official AIM files (mmaction/models/'
                      '...): also time the official PyTorch model, same batch and precision, '
                      'and report ours / official (benchmarks.official_torch; needs torch)')
  flags.DEFINE_string('official_modes', 'eager,compiled',
                      'with --official: which official runs, comma-separated: eager (as '
                      'released) and/or compiled (torch.compile + fused AdamW, same autocast, '
                      'weights and trainable set)')
  flags.DEFINE_string('official_compile_backend', 'inductor',
                      'torch.compile backend of the compiled official run (inductor needs a C++ '
                      "compiler on CPU; 'eager' only checks the Dynamo path)")
  flags.DEFINE_bool('official_first', True, 'with --official: time the official model before '
                    'ours (torch hands its cache back before JAX allocates); '
                    '--noofficial_first times ours first, so a time limit that stops a slow '
                    'torch.compile still leaves our rows in --out')
  flags.DEFINE_list('after_official', [], 'with --official --noofficial_first: the --variant '
                    'rows (names, comma-separated) timed after the official rows rather than '
                    'before, e.g. a kernel never run on this GPU: if it hangs or poisons the '
                    "process, the side by side is already in --out (the 'default' row cannot "
                    'be named)')
  flags.DEFINE_string('profile', '', 'also trace --profile_steps steps per mode with the JAX '
                      'profiler into DIR/MODE and report kernel time by family (GEMM, attention, '
                      'transpose/copy, reduction, elementwise, other) in ms/step and %')
  flags.DEFINE_integer('profile_steps', 3, 'steps traced under --profile', lower_bound=1)
  flags.DEFINE_multi_string('variant', [], 'also time our steps with these config fields set, '
                            'as one more row per mode: NAME:FIELD=VALUE[,FIELD=VALUE...], e.g. '
                            'cudnn:model.attention_impl=cudnn,model.temporal_attention='
                            'dot_product_attention (repeatable; a row that fails keeps its error '
                            'in its row and the others still run, a failed default row makes '
                            'the exit status 1; its profile goes to --profile DIR/NAME/MODE)')
  flags.mark_flags_as_required(['config'])


def run(argv=None):
  """The command: its flags and --config parsed as `aim_jax.train` parses them (a bad flag,
  config file or field: one line, exit status 2)."""
  _define_flags()
  from aim_jax import run_config
  app.run(main, argv=argv, flags_parser=run_config.flags_parser('step_benchmark'))


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  run()
