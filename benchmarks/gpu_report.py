"""The GPU run's figures against the GPU performance issue's targets.

  python -m benchmarks.gpu_report OUT_DIR [--json report.json] [--predicted GPU_AOT.json ...]

Reads what `bash benchmarks/gpu.sh OUT_DIR` wrote (`b16_train.json`, `b16_eval.json`,
`l14_train.json`, `l14_unrolled.json`, `cudnn_attention.json`, `pallas_attention.json`
when cuDNN failed its check, `env.txt`, `summary.txt`) and prints, as markdown, one row
per implementation and mode, then each target with its figure and `met`, `missed` or
`not measured` (a missing file, row or figure is never `met`):

* train: our fastest row >= 1.3x the compiled official row and >= 2x the eager one,
  transposes < 5% of its profiled kernel time, its memory at or below the compiled
  official's peak, and the 45% MFU aim;
* eval: our fastest row >= 1.3x the compiled official eval, and the 55% MFU aim;
* L/14: every row measured, compiled in under a minute; the unrolled L/14 row
  (`l14_unrolled.json`, when the run had time for it) against the same minute, which
  decides whether `model.scan_layers=False` may become L/14's default;
* the cuDNN smoke test: padded attention forward and backward match XLA; likewise the Pallas
  flash attention's part when cuDNN failed its check ('auto''s next choice);
* the device check of the Pallas LayerNorm and MLP kernels (`norm_kernels.json`'s
  `auto_check`, models/kernel_choice.py).

Each of our rows names the attention kernel it ran with (`attention.attention_impl` of the
row: what 'auto' chose on the device). With `--predicted` (files written by
`benchmarks.gpu_aot --out`), each of our rows also shows the step time predicted for the same
program, and measured / predicted: a gpu_aot row stands for a measured row of the same mode,
global batch, devices and attention kernel, and of the same kind: `pallas_kernels` (the
variant of that name: the Pallas LayerNorms and MLP kernels), `unrolled` (the variant of that
name; the rows of `l14_unrolled.json`), or plain (any other).

Our rows' memory is `program_memory_bytes` (the compiled step's own need: the process's
peak counter only grows from row to row).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

GiB = 2 ** 30
TARGETS = dict(train_vs_compiled=1.3, train_vs_eager=2.0, transpose_share=0.05,
               train_mfu_aim=0.45, eval_vs_compiled=1.3, eval_mfu_aim=0.55, l14_compile_s=60.0)


def _load(out_dir: str, name: str) -> Optional[dict]:
  path = os.path.join(out_dir, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f'{path}: not JSON ({e})') from None


def _ours(run: Optional[dict]) -> list[dict]:
  return [r for r in (run or {}).get('results', []) if 'error' not in r]


def _official_rows(run: Optional[dict]) -> list[dict]:
  """The official rows, or those measured before a time limit stopped the part."""
  return (run or {}).get('official') or (run or {}).get('official_rows_so_far') or []


def _official(run: Optional[dict], mode: str, official_mode: str) -> Optional[dict]:
  for r in _official_rows(run):
    if r.get('mode') == mode and r.get('official_mode', 'eager') == official_mode \
        and 'error' not in r:
      return r
  return None


def _per_device(r: dict) -> float:
  return r['clips_per_s'] / r.get('devices', 1)


def _check(name: str, value: Optional[float], target: float, fmt: str, higher: bool = True,
           note: str = '') -> dict:
  if value is None:
    status = 'not measured'
  else:
    status = 'met' if (value >= target if higher else value <= target) else 'missed'
  shown = 'n/a' if value is None else fmt.format(value)
  want = ('>= ' if higher else '<= ') + fmt.format(target)
  return dict(target=name, value=value, shown=shown, want=want, status=status, note=note)


def _mode_checks(run: Optional[dict], mode: str) -> list[dict]:
  ours = [r for r in _ours(run) if r['mode'] == mode]
  best = max(ours, key=_per_device) if ours else None
  label = f" ({best.get('variant', 'default')})" if best else ''
  compiled = _official(run, mode, 'compiled')
  eager = _official(run, mode, 'eager')
  ratio = lambda o: _per_device(best) / o['clips_per_s'] if best and o else None
  checks = [_check(f'{mode}: fastest row{label} / official compiled', ratio(compiled),
                   TARGETS[f'{mode}_vs_compiled'], '{:.2f}x')]
  if mode == 'train':
    checks.append(_check(f'train: fastest row{label} / official eager', ratio(eager),
                         TARGETS['train_vs_eager'], '{:.2f}x'))
    share = None
    if best and best.get('profile', {}).get('families'):   # not when the profiler failed
      share = best['profile']['families'].get('transpose/copy', {}).get('share')
    checks.append(_check(f'train: transposes and copies, share of kernel time{label}', share,
                         TARGETS['transpose_share'], '{:.1%}', higher=False))
    mem = best.get('program_memory_bytes') if best else None
    limit = compiled.get('peak_memory_bytes') if compiled else None
    checks.append(_check(f'train: memory{label} / official compiled peak',
                         mem / limit if mem and limit else None, 1.0, '{:.2f}', higher=False,
                         note=(f'{mem / GiB:.1f} vs {limit / GiB:.1f} GiB' if mem and limit
                               else '')))
  aim = best.get('mfu') if best else None
  checks.append(_check(f'{mode}: MFU aim{label}', aim, TARGETS[f'{mode}_mfu_aim'], '{:.1%}'))
  return checks


def _kind(variant: str) -> str:
  return variant if variant in ('pallas_kernels', 'unrolled') else 'plain'


def _key(r: dict, kind: str) -> tuple:
  return (r.get('mode'), r.get('batch'), r.get('devices', 1),
          (r.get('attention') or {}).get('attention_impl'), kind)


def load_predictions(paths: list[str]) -> dict:
  """The rows of `benchmarks.gpu_aot` outputs, by what they stand for (`_key`)."""
  out = {}
  for path in paths:
    try:
      with open(path) as f:
        rows = json.load(f)['rows']
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f'--predicted {path}: not a benchmarks.gpu_aot output '
                       f'({type(e).__name__}: {e})') from None
    for r in rows:
      if 'predicted_step_ms' in r:
        out.setdefault(_key(r, _kind(r.get('variant', 'default'))), r)
  return out


def _our_row(r: dict, mode: str, variant: str = '', predictions: Optional[dict] = None) -> dict:
  name = r.get('variant', 'default')
  kind = _kind(variant or name)
  name = f'{variant}, {name}' if variant and name != 'default' else (variant or name)
  ok = 'error' not in r
  kernel = (r.get('attention') or {}).get('attention_impl')
  step_ms = 1e3 * r['step_s_median'] if ok else None
  predicted = (predictions or {}).get(_key(r, kind), {}).get('predicted_step_ms')
  return dict(impl=f'aim_jax [{name}]' + (f' ({kernel} attention)' if kernel else ''),
              mode=mode, error=r.get('error'),
              clips=_per_device(r) if ok else None, step_ms=step_ms,
              mem_gib=(r.get('program_memory_bytes') or 0) / GiB or None,
              mfu=r.get('mfu'), compile_s=r.get('compile_s'), predicted_ms=predicted,
              measured_vs_predicted=step_ms / predicted if step_ms and predicted else None)


def _compile_check(name: str, run: Optional[dict]) -> dict:
  """The slowest compile of a run's rows against the minute; not measured without the
  file or when a row failed (its error in the note)."""
  rows = (run or {}).get('results', [])
  ok = [r for r in rows if 'error' not in r]
  slowest = max((r['compile_s'] for r in ok), default=None)
  return _check(name, slowest if rows and len(ok) == len(rows) else None,
                TARGETS['l14_compile_s'], '{:.0f} s', higher=False,
                note='; '.join(f"{r.get('variant')}: {r['error'][:80]}"
                               for r in rows if 'error' in r))


def _pass_check(target: str, value: Optional[bool], note: str) -> dict:
  """A check that passes or not (`value`; None: not run)."""
  return dict(target=target, value=value, shown='n/a' if value is None else str(value),
              want='True', status='not measured' if value is None else
              ('met' if value else 'missed'), note=note)


def _temporal_kernel_check(runs: dict) -> dict:
  """The decision the `temporal_pallas` rows are for: is the default row with the temporal
  attention as Pallas kernels faster than the default, in train and in eval (then
  `attention_choice.TEMPORAL_PALLAS_PLATFORMS = ('gpu',)`)? Not measured without both rows."""
  notes, faster = [], []
  for mode, run in runs.items():
    step = {r.get('variant', 'default'): 1e3 * r['step_s_median'] for r in _ours(run)}
    if 'default' in step and 'temporal_pallas' in step:
      faster.append(step['temporal_pallas'] < step['default'])
      notes.append(f"{mode} {step['temporal_pallas']:.1f} vs {step['default']:.1f} ms")
  return _pass_check("temporal_pallas rows faster than the default (then 'auto' may take "
                     'them: TEMPORAL_PALLAS_PLATFORMS)', all(faster) if faster else None,
                     '; '.join(notes))


def _smoke_check(name: str, impl: str, smoke: Optional[dict]) -> dict:
  """An attention part (`benchmarks.attention_smoke`): its padded case against XLA."""
  padded = (smoke or {}).get('padded', {})
  ran = bool(smoke) and smoke.get('implementation') == impl and bool(padded)
  return _pass_check(f'{name}, padded, forward + backward = XLA',
                     bool(padded.get('ok')) if ran else None,
                     f"implementation {smoke.get('implementation')}" if smoke else '')


def report(out_dir: str, predicted: tuple[str, ...] = ()) -> dict:
  """Rows and target checks of one gpu.sh output folder; `predicted`: gpu_aot outputs whose
  step times go beside our rows."""
  if not os.path.isdir(out_dir):
    raise ValueError(f'{out_dir}: no such folder (the OUT_DIR of benchmarks/gpu.sh)')
  predictions = load_predictions(list(predicted))
  runs = {m: _load(out_dir, f'b16_{m}.json') for m in ('train', 'eval')}
  l14 = _load(out_dir, 'l14_train.json')
  smoke = _load(out_dir, 'cudnn_attention.json')
  unrolled = _load(out_dir, 'l14_unrolled.json')
  rows = []
  for mode, run in runs.items():
    rows += [_our_row(r, mode, predictions=predictions) for r in (run or {}).get('results', [])]
    for o in _official_rows(run):
      rows.append(dict(impl=f"official {o.get('official_mode', 'eager')}", mode=mode,
                       error=o.get('error'), clips=o.get('clips_per_s'),
                       step_ms=1e3 * o['step_s_median'] if 'error' not in o else None,
                       mem_gib=(o.get('peak_memory_bytes') or 0) / GiB or None,
                       mfu=o.get('mfu'), compile_s=o.get('compile_s')))
  rows += [_our_row(r, 'L/14 train', predictions=predictions)
           for r in (l14 or {}).get('results', [])]
  rows += [_our_row(r, 'L/14 train', 'unrolled', predictions)
           for r in (unrolled or {}).get('results', [])]
  checks = _mode_checks(runs['train'], 'train') + _mode_checks(runs['eval'], 'eval')
  checks.append(_compile_check('L/14: slowest compile of its rows', l14))
  checks.append(_compile_check('L/14 unrolled (model.scan_layers=False): slowest compile',
                               unrolled))
  checks.append(_smoke_check('cuDNN attention', 'cudnn', smoke))
  pallas = _load(out_dir, 'pallas_attention.json')
  if pallas or (smoke or {}).get('auto_check', {}).get('pallas'):   # run when cuDNN failed
    checks.append(_smoke_check('Pallas flash attention', 'pallas', pallas))
  checks.append(_temporal_kernel_check(runs))
  kernels = (_load(out_dir, 'norm_kernels.json') or {}).get('auto_check')
  checks.append(_pass_check("Pallas LayerNorm and MLP kernels: 'auto''s device check",
                            kernels['ok'] if kernels else None, (kernels or {}).get('why', '')))
  restart = _restart(_load(out_dir, 'compile_cache.json'), runs['train'])
  env = ''
  if os.path.exists(os.path.join(out_dir, 'env.txt')):
    with open(os.path.join(out_dir, 'env.txt')) as f:
      env = f.read().strip()
  return dict(out_dir=out_dir, env=env, rows=rows, checks=checks, restart=restart,
              complete={m: bool(r and r.get('complete')) for m, r in runs.items()})


def _restart(cache: Optional[dict], train: Optional[dict]) -> Optional[dict]:
  """The compile_cache part (`benchmarks.compile_time` against the cache the run filled):
  the B/16 train step traced and loaded in a fresh process, beside its compile in b16_train."""
  loads = [r for r in (cache or {}).get('rows', []) if r.get('loaded')]
  if not loads:
    return None
  last = loads[-1]
  compiled = next((r.get('compile_s') for r in _ours(train)
                   if r.get('variant', 'default') == 'default' and 'error' not in r), None)
  return dict(lower_s=last['lower_s'], load_s=last['compile_s'], compile_s=compiled)


def format_report(rep: dict) -> str:
  fmt = lambda v, f: 'n/a' if v is None else f.format(v)
  lines = ['| impl | mode | clips/s/device | step ms | memory GiB | MFU | compile s | '
           'predicted ms | measured / predicted |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rep['rows']:
    if r['error']:
      lines.append(f"| {r['impl']} | {r['mode']} | {r['error'].splitlines()[0][:70]} "
                   '| | | | | | |')
      continue
    lines.append(f"| {r['impl']} | {r['mode']} | {fmt(r['clips'], '{:.1f}')} | "
                 f"{fmt(r['step_ms'], '{:.1f}')} | {fmt(r['mem_gib'], '{:.1f}')} | "
                 f"{fmt(r['mfu'], '{:.1%}')} | {fmt(r['compile_s'], '{:.1f}')} | "
                 f"{fmt(r.get('predicted_ms'), '{:.1f}')} | "
                 f"{fmt(r.get('measured_vs_predicted'), '{:.2f}')} |")
  lines += ['', '| target | figure | wanted | status |', '|---|---:|---:|---|']
  for c in rep['checks']:
    note = f" ({c['note']})" if c.get('note') else ''
    lines.append(f"| {c['target']} | {c['shown']}{note} | {c['want']} | {c['status']} |")
  r = rep.get('restart')
  if r:
    lines += ['', f"A restart (compilation cache): the B/16 train step traced in "
              f"{r['lower_s']:.1f} s and loaded in {r['load_s']:.1f} s, where b16_train "
              f"compiled it in {fmt(r['compile_s'], '{:.1f}')} s (lowering included)."]
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  args = argv[1:]
  json_out = None
  predicted = []
  while '--predicted' in args:
    i = args.index('--predicted')
    if i + 1 >= len(args):
      print('gpu_report: --predicted needs a file name', file=sys.stderr)
      return 2
    predicted.append(args[i + 1])
    del args[i:i + 2]
  if '--json' in args:
    i = args.index('--json')
    if i + 1 >= len(args):
      print('gpu_report: --json needs a file name', file=sys.stderr)
      return 2
    json_out = args[i + 1]
    del args[i:i + 2]
  if len(args) != 1:
    print('usage: python -m benchmarks.gpu_report OUT_DIR [--json FILE] [--predicted FILE ...]',
          file=sys.stderr)
    return 2
  try:
    rep = report(args[0], tuple(predicted))
  except ValueError as e:
    print(f'gpu_report: {e}', file=sys.stderr)
    return 2
  print(format_report(rep))
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(rep, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
