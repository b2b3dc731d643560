"""Where a step's device time goes: kernel (device op) time from a JAX profiler trace, by family.

`python -m benchmarks.step_benchmark ... --profile DIR` traces a few steps with
`jax.profiler.trace(DIR/MODE, create_perfetto_trace=True)` and summarises them here.
The trace is read from the Chrome-trace JSON the profiler writes next to the
`.xplane.pb` (`perfetto_trace.json.gz`, or `HOST.trace.json.gz`), so reading it
needs neither tensorflow nor the tensorboard profile plugin.

Which events are device ops:

* GPU (and other accelerators): the complete events of the `/device:...`
  processes. On a GPU each event is one kernel on a stream (`nvjet_sm90_*`,
  `gemm_fusion_dot_123`, `loop_add_fusion_4`, cuDNN kernels...). When the trace
  also holds op-level lines (`XLA Ops`, `XLA Modules`, `Steps`), only the stream
  lines are counted, so no time is counted twice; without stream lines (a TPU),
  the `XLA Ops` line.
* CPU (no device process): XLA:CPU runs each HLO op (a thunk) on its worker
  threads, named after the HLO instruction (`ynn_fusion.117`, `dot.54`,
  `multiply_reduce_fusion.74`). Events named like an HLO instruction on threads
  other than the Python thread are counted. XLA:CPU runs independent ops on
  several threads at once, so the kernel time can exceed the wall time.

Families (`FAMILIES`, first match wins): GEMM (cuBLAS `nvjet_*`/`*gemm*`, XLA's
Triton `gemm_fusion_dot*`, cutlass, cuDNN convolutions, XLA:CPU `dot`/`ynn_fusion`
/oneDNN), attention (flash / cuDNN fused attention), transpose/copy (transposes,
copies, memcpy/memset, layout padding), reduction (reduce, softmax, LayerNorm
statistics), elementwise (the other `loop_*`/`input_*`/`wrapped_*` fusions and
XLA:CPU elementwise fusions), and other.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from typing import Iterable, Mapping

# (family, regex on the kernel name), tried in order.
FAMILIES = (
    # Attention first: a fused attention kernel's name may also say "gemm" or "wgmma".
    ('attention', re.compile(r'flash|fmha|sdpa|attn|attention|mha_', re.I)),
    ('gemm', re.compile(r'nvjet|gemm|cublas|cutlass|xmma|s16816|wgmma|\bdot\b|^dot[._]|'
                        r'_dot[._]|ynn_fusion|onednn|matmul|convolution|conv2d|fprop|dgrad|wgrad',
                        re.I)),
    ('transpose/copy', re.compile(r'transpose|copy|memcpy|memset|padding|concatenate|'
                                  r'dynamic.update.slice|bitcast_convert', re.I)),
    ('reduction', re.compile(r'reduce|softmax|layer.?norm|rms.?norm|argmax|scatter', re.I)),
    ('elementwise', re.compile(r'^(loop|input|wrapped)_|fusion|add|multiply|subtract|divide|'
                               r'convert|exp|tanh|select|compare|broadcast|slice|negate|sqrt|'
                               r'rsqrt|maximum|minimum|iota|pad', re.I)),
)
FAMILY_NAMES = ('gemm', 'attention', 'transpose/copy', 'reduction', 'elementwise', 'other')

# XLA:CPU ops are named after their HLO instruction: lowercase words, `_`/`-`, `.N`.
_HLO_NAME = re.compile(r'^[a-z][a-z0-9_\-]*(\.\d+)*$')
# Op-level (not kernel) lines of a device process.
_OP_LINES = ('xla ops', 'xla modules', 'steps', 'framework', 'source', 'tensorflow', 'launch',
             'tracemes', 'xla traceme')


def family(name: str) -> str:
  """The kernel family of one kernel or XLA:CPU op name."""
  for fam, pattern in FAMILIES:
    if pattern.search(name):
      return fam
  return 'other'


def find_trace(trace_dir: str | os.PathLike) -> str:
  """The newest Chrome-trace JSON the profiler wrote under `trace_dir`."""
  found = []
  for pattern in ('**/perfetto_trace.json.gz', '**/*.trace.json.gz'):
    found = glob.glob(os.path.join(str(trace_dir), pattern), recursive=True)
    if found:
      break
  if not found:
    raise FileNotFoundError(f'{trace_dir}: no *.trace.json.gz / perfetto_trace.json.gz under it '
                            '(trace with jax.profiler.trace(DIR, create_perfetto_trace=True))')
  return max(found, key=os.path.getmtime)


def load_events(path: str | os.PathLike) -> list[dict]:
  """The trace events of a Chrome-trace JSON file (.json or .json.gz)."""
  opener = gzip.open if str(path).endswith('.gz') else open
  try:
    with opener(path, 'rt') as f:
      trace = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable Chrome-trace JSON file: {e}') from e
  events = trace.get('traceEvents') if isinstance(trace, dict) else trace
  if not isinstance(events, list):
    raise ValueError(f'{path}: no "traceEvents" list')
  return events


def device_op_events(events: Iterable[Mapping]) -> tuple[list[Mapping], str]:
  """(the complete events that are device kernels / ops, 'device' or 'cpu')."""
  events = list(events)
  procs, threads = {}, {}
  for e in events:
    if e.get('ph') != 'M':
      continue
    name = str(e.get('args', {}).get('name', ''))
    if e.get('name') == 'process_name':
      procs[e.get('pid')] = name
    elif e.get('name') == 'thread_name':
      threads[(e.get('pid'), e.get('tid'))] = name
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e and 'name' in e]
  device_pids = {p for p, n in procs.items() if '/device:' in n}
  if device_pids:
    def line(e):
      return threads.get((e.get('pid'), e.get('tid')), '').lower()
    on_device = [e for e in complete if e.get('pid') in device_pids]
    streams = [e for e in on_device if 'stream' in line(e)]
    if streams:                                   # GPU: the kernels, per CUDA stream
      return streams, 'device'
    xla_ops = [e for e in on_device if line(e) == 'xla ops']
    if xla_ops:                                   # TPU: one line of ops, beside module/step lines
      return xla_ops, 'device'
    return [e for e in on_device if not line(e).startswith(_OP_LINES)] or on_device, 'device'
  python_threads = {k for k, n in threads.items() if n.lower() in ('python', 'main')}
  return [e for e in complete if (e.get('pid'), e.get('tid')) not in python_threads
          and _HLO_NAME.match(str(e['name']))], 'cpu'


def summarize_events(events: Iterable[Mapping], steps: int, wall_s: float | None = None,
                     top: int = 25) -> dict:
  """Kernel time per family and per kernel name, in ms per step, from trace events."""
  if steps < 1:
    raise ValueError(f'steps = {steps}: at least one traced step is needed')
  ops, source = device_op_events(events)
  per_name: dict[str, float] = {}
  for e in ops:
    per_name[e['name']] = per_name.get(e['name'], 0.0) + float(e['dur'])     # microseconds
  total_us = sum(per_name.values())
  fam_us = dict.fromkeys(FAMILY_NAMES, 0.0)
  for name, us in per_name.items():
    fam_us[family(name)] += us
  ms = lambda us: us / 1e3 / steps
  ranked = sorted(per_name.items(), key=lambda kv: -kv[1])
  return dict(
      source=source, steps=steps, events=len(ops), distinct_kernels=len(per_name),
      kernel_ms_per_step=ms(total_us),
      wall_ms_per_step=(1e3 * wall_s / steps) if wall_s is not None else None,
      families={f: dict(ms_per_step=ms(us), share=(us / total_us) if total_us else 0.0)
                for f, us in fam_us.items()},
      top_kernels=[dict(name=n, family=family(n), ms_per_step=ms(us)) for n, us in ranked[:top]],
      kernels_ms_per_step={n: ms(us) for n, us in ranked})


def summarize_trace(trace_dir: str | os.PathLike, steps: int, wall_s: float | None = None) -> dict:
  """`summarize_events` of the trace under `trace_dir`; records which file was read."""
  path = find_trace(trace_dir)
  out = summarize_events(load_events(path), steps, wall_s)
  out['trace_file'] = str(path)
  if not out['events']:
    raise ValueError(f'{path}: no device kernel or XLA op events in the trace')
  return out


def format_summary(mode: str, s: Mapping) -> str:
  """Markdown table: one row per family, ms/step and share, then the traced totals."""
  lines = [f'| {mode}: kernel family | ms/step | share |', '|---|---:|---:|']
  for fam in FAMILY_NAMES:
    f = s['families'][fam]
    lines.append(f'| {fam} | {f["ms_per_step"]:.2f} | {100 * f["share"]:.1f}% |')
  wall = f'{s["wall_ms_per_step"]:.2f}' if s.get('wall_ms_per_step') is not None else 'n/a'
  lines.append(f'| all kernels ({s["source"]}, {s["distinct_kernels"]} names, wall {wall} '
               f'ms/step) | {s["kernel_ms_per_step"]:.2f} | 100% |')
  return '\n'.join(lines)
