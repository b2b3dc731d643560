r"""Compile the train or eval step for a GPU that is not here, and read the program.

  python -m benchmarks.gpu_aot --config configs/k400.py:b16_f8 --mode train --batch 64 \
      --variant cudnn:model.attention_impl=cudnn,model.temporal_attention=dot_product_attention \
      --out benchmarks/results/aot-h200-b16-train.json

XLA's GPU compiler runs without a GPU when it is given the target's description
(`benchmarks/gpu_targets/NAME.txtpb`): `jax.experimental.topologies` makes
compile-only devices of that GPU, the step is built exactly as training builds it
(`aim_jax.train_state`, same shardings, same mesh context) and lowered on abstract
arguments, and `.compile()` runs the whole GPU pipeline (fusion, layout assignment,
cuDNN and Triton custom calls, buffer assignment) for that device. What comes out:

* whether it compiles at all for that GPU (a fused kernel that the target cannot
  take fails here, not in a GPU session), and how long lowering and compiling take;
* the device memory the step needs (`memory_analysis`: arguments, outputs,
  temporaries), to compare with the measured peak;
* every kernel launch, from the optimised HLO (`benchmarks.hlo_kernels`): bytes
  moved, matrix FLOPs, family, model module, and a roofline prediction of the
  step time with rates calibrated on a measured H200 profile.

It needs JAX's CUDA plugin (`pip install "jax[cuda13]"`, no GPU, no driver) and no
tensorflow. Without the plugin it stops with one line saying so. Autotuning needs
the device, so the GEMM tiles are XLA's defaults; the layouts, fusions and
transposes are the ones the GPU run gets (checked against a measured profile:
BENCHMARKS.md, "GPU compile without a GPU").
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from absl import app, flags

FLAGS = flags.FLAGS
TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')


def _prepare_env() -> None:
  # The CUDA plugin checks the local CUDA libraries against a driver at import: there is
  # none on a host without a GPU, and only the compiler is used.
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def target_devices(target: str, devices: int) -> list:
  """`devices` compile-only devices of the GPU described by `target` (a name under
  benchmarks/gpu_targets/ or a .txtpb path)."""
  from jax.experimental import topologies
  path = target if target.endswith('.txtpb') else os.path.join(TARGETS, f'{target}.txtpb')
  if not os.path.exists(path):
    known = sorted(f[:-6] for f in os.listdir(TARGETS) if f.endswith('.txtpb'))
    raise ValueError(f'--target {target}: no {path} (known: {", ".join(known)})')
  with open(path) as f:
    spec = f.read()
  try:
    topo = topologies.get_topology_desc(platform='cuda', topology_name=target,
                                        topology=f'1x1x{devices}', target_config=spec)
  except NotImplementedError:
    raise RuntimeError('this jax has no CUDA plugin to compile with: pip install '
                       '"jax[cuda13]" (no GPU needed)') from None
  return list(topo.devices)


def compile_step(config: Any, mode: str, batch: int, devices: list) -> dict:
  """Lower and compile one step on `devices` (compile-only); its HLO and memory figures."""
  from aim_jax import sharding, train_state
  mesh = sharding.make_mesh(config.mesh, devices)
  dp = sharding.data_parallel_size(mesh)
  if batch % dp:
    raise ValueError(f'--batch {batch} is not divisible by the data-parallel size {dp}')
  setup = train_state.create_train_state(config, mesh)
  state, inputs = train_state.abstract_train_args(setup, batch)
  t0 = time.perf_counter()
  with sharding.mesh_context(mesh, setup.rules):
    if mode == 'train':
      lowered = train_state.train_step_fn(setup).lower(state, inputs)
    else:
      lowered = train_state.eval_logits_fn(setup).lower(state['params'], inputs['video'])
    t1 = time.perf_counter()
    compiled = lowered.compile()
  t2 = time.perf_counter()
  from benchmarks import step_benchmark
  m = compiled.memory_analysis()
  memory = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                generated_code=m.generated_code_size_in_bytes)
  return dict(hlo=compiled.as_text(), model_cfg=setup.model_cfg,
              attention=train_state.attention_fields(setup), lower_s=t1 - t0, compile_s=t2 - t1,
              memory=memory, program_memory_bytes=step_benchmark.program_memory_bytes(compiled))


def analyse(config: Any, mode: str, batch: int, devices: list, hlo_path: str = '',
            measured: Optional[dict] = None) -> dict:
  """One row: compile, then the kernels and the predicted step time per device; with
  `measured` (a profile's ms per step by kernel name), those kernels beside the prediction."""
  from aim_jax import flops
  from benchmarks import hlo_kernels, step_benchmark
  c = compile_step(config, mode, batch, devices)
  if hlo_path:
    with open(hlo_path, 'w') as f:
      f.write(c['hlo'])
  ks = hlo_kernels.kernels(c['hlo'])
  summary = hlo_kernels.summarize(ks)
  step_s = summary['predicted_ms'] / 1e3
  macs = flops.train_macs(c['model_cfg'], config.full_finetune) if mode == 'train' else \
      flops.forward_macs(c['model_cfg'])
  per_device = batch / len(devices) / step_s
  peak = step_benchmark.device_peak(devices[0])
  fams = summary['families']
  return dict(
      mode=mode, batch=batch, devices=len(devices), device_kind=devices[0].device_kind,
      dtype=c['model_cfg']['dtype'], attention=c['attention'], lower_s=round(c['lower_s'], 2),
      compile_s=round(c['compile_s'], 2), memory=c['memory'],
      program_memory_bytes=c['program_memory_bytes'], gmacs_per_clip=macs / 1e9,
      predicted_step_ms=summary['predicted_ms'], predicted_clips_per_s_per_device=per_device,
      predicted_mfu=2 * macs * per_device / peak if peak else None,
      transpose_share=fams.get('transpose/copy', {}).get('share', 0.0), **{
          k: summary[k] for k in ('launches', 'families', 'top_kernels', 'top_places')},
      **({'measured': hlo_kernels.match_profile(ks, measured)} if measured is not None else {}))


def format_table(rows: list[dict]) -> str:
  lines = ['| variant | mode | compiles | program GiB | predicted ms/step | clips/s/device | '
           'MFU | transposes | compile s |', '|---|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    if 'error' in r:
      lines.append(f'| {r["variant"]} | {r["mode"]} | no: {r["error"].splitlines()[0][:80]} '
                   '| | | | | | |')
      continue
    mfu = f'{100 * r["predicted_mfu"]:.1f}%' if r['predicted_mfu'] is not None else 'n/a'
    lines.append(f'| {r["variant"]} | {r["mode"]} | yes | {r["program_memory_bytes"] / 2**30:.1f}'
                 f' | {r["predicted_step_ms"]:.1f} | {r["predicted_clips_per_s_per_device"]:.1f}'
                 f' | {mfu} | {100 * r["transpose_share"]:.1f}% | {r["compile_s"]:.1f} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from aim_jax import errors
  from benchmarks import hlo_kernels, step_benchmark
  config = FLAGS.config
  batch = FLAGS.batch or config.batch_size
  modes = ['train', 'eval'] if FLAGS.mode == 'both' else [FLAGS.mode]
  try:
    variants = step_benchmark.parse_variants(FLAGS.variant, config)
    devices = target_devices(FLAGS.target, FLAGS.devices)
  except (ValueError, RuntimeError) as e:
    print(f'gpu_aot: {e}', file=sys.stderr, flush=True)
    raise SystemExit(errors.EXIT_USER_ERROR) from None
  measured = None
  if FLAGS.measured:
    with open(FLAGS.measured) as f:
      measured = json.load(f)['kernels_ms_per_step']
  rows = []
  # XLA_FLAGS (e.g. --xla_gpu_enable_triton_gemm=false: every product on cuBLAS) reaches
  # both compiles; the train step's config.compiler_options override it key by key.
  out = dict(target=FLAGS.target, rows=rows, versions=step_benchmark.versions(), argv=sys.argv,
             xla_flags=os.environ.get('XLA_FLAGS', ''), date=time.strftime('%Y-%m-%d'),
             rates=hlo_kernels.RATES)
  for mode in modes:
    for name, cfg, spec in variants:
      hlo_path = os.path.join(FLAGS.hlo_dir, f'{name}_{mode}.hlo') if FLAGS.hlo_dir else ''
      if hlo_path:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
      try:
        r = analyse(cfg, mode, batch, devices, hlo_path, measured)
      except Exception as e:  # a variant the target cannot compile keeps its error
        r = dict(mode=mode, error=f'{type(e).__name__}: {e}'[:2000])
      r['variant'] = name
      if spec:
        r['overrides'] = spec
      rows.append(r)
      print(json.dumps({k: v for k, v in r.items() if k not in ('top_kernels', 'top_places',
                                                                  'measured')}), flush=True)
      if FLAGS.out:
        with open(FLAGS.out, 'w') as f:
          json.dump(out, f, indent=1)
  print(format_table(rows))


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'config file (configs/NAME.py[:ARG])',
                                  lock_config=True)
  flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'both'], 'which step to compile')
  flags.DEFINE_integer('batch', 0, 'global batch (default: the config\'s batch_size)')
  flags.DEFINE_string('target', 'h200', 'the GPU: a name in benchmarks/gpu_targets/ or a '
                      '.txtpb path (stream_executor.GpuTargetConfigProto)')
  flags.DEFINE_integer('devices', 1, 'how many such GPUs the mesh spans (config.mesh)')
  flags.DEFINE_multi_string('variant', [], 'also compile with these config fields set: '
                            'NAME:FIELD=VALUE[,FIELD=VALUE...] (as in step_benchmark)')
  flags.DEFINE_string('out', '', 'write the rows as JSON here')
  flags.DEFINE_string('hlo_dir', '', 'also write each optimised program here (VARIANT_MODE.hlo)')
  flags.DEFINE_string('measured', '', 'a kernels.json of a `step_benchmark --profile` run on '
                      'that GPU: each row then lists measured beside predicted kernel times')
  flags.mark_flags_as_required(['config'])


def run(argv=None):
  _prepare_env()
  _define_flags()
  app.run(main, argv=argv)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  run()
