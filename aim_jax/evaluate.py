r"""Multi-view test of a checkpoint: the paper's numbers from a checkpoint.

  python -m aim_jax.evaluate --config configs/k400.py:b16_f8 --checkpoint DIR \
      [--which best] [--output_dir OUT] [--labels classes.txt] [--config.eval.split=val]

DIR is either a parameter checkpoint (`aim_jax.checkpoints`, written by
`python -m aim_jax.convert` from an official AIM or CLIP checkpoint) or a
training workdir (its latest or best checkpoint, `--which`).

The checkpoint's own config.json decides the architecture; the config file
supplies data, views, batch size, mesh and execution options (dtype, scan,
attention). An architecture field on which the two disagree (num_frames,
num_classes, width...) is an error that names the field, so that a K400
checkpoint is never silently run with another recipe's frame count.

Views: `data.test_clips x data.test_crops` for split 'test' (official K400:
3 clips x 1 crop; SSv2: 1 x 3), `val_*` for 'val'. Softmax probabilities are
averaged per video (`eval.average_clips='prob'`, the official test_cfg) or
logits ('score'). Outputs (in --output_dir, default DIR/eval_<split> for a parameter
checkpoint, DIR/eval_<split>_<which> for a training workdir): predictions.csv (or .jsonl),
summary.json, per_class.csv, confusion.png.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from aim_jax import checkpoints, errors, multiview, reports, run_config

# ---------------------------------------------------------------------------
# The evaluation run
# ---------------------------------------------------------------------------

def gather_predictions(result: multiview.EvalResult
                       ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
  """Every process's per-video (keys, labels, topk_classes, topk_scores), process by process.

  `EvalResult` holds the videos this process read; the predictions file must
  hold each video of the split once, so the rows travel to every process
  (`process_allgather`; collective: every process calls it). Counts differ
  between processes: rows are padded to the largest count, keys sent as
  UTF-8 bytes padded to the longest, and the padding dropped on arrival.
  """
  keys, labels = list(result.keys), np.asarray(result.labels, np.int64)
  classes = np.asarray(result.topk_classes, np.int64)
  scores = np.asarray(result.topk_scores, np.float32)
  if jax.process_count() == 1:
    return keys, labels, classes, scores
  from jax.experimental import multihost_utils
  encoded = [k.encode('utf-8') for k in keys]
  sizes = np.asarray(multihost_utils.process_allgather(
      np.array([len(keys), max(map(len, encoded), default=0)], np.int32)))   # (P, 2)
  rows, width = max(int(sizes[:, 0].max()), 1), max(int(sizes[:, 1].max()), 1)
  key_bytes = np.zeros((rows, width), np.uint8)
  key_lengths = np.zeros((rows,), np.int32)
  for i, e in enumerate(encoded):
    key_bytes[i, :len(e)] = np.frombuffer(e, np.uint8)
    key_lengths[i] = len(e)

  def pad(x, dtype):
    out = np.zeros((rows,) + x.shape[1:], dtype)
    out[:len(x)] = x
    return out

  # int32 on the wire: jax without x64 would narrow int64 silently.
  local = dict(key_bytes=key_bytes, key_lengths=key_lengths, labels=pad(labels, np.int32),
               classes=pad(classes, np.int32), scores=pad(scores, np.float32))
  every = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(local).items()}
  out_keys, out_labels, out_classes, out_scores = [], [], [], []
  for p, count in enumerate(sizes[:, 0]):                   # every[name]: (P, rows, ...)
    out_keys += [bytes(every['key_bytes'][p, i, :every['key_lengths'][p, i]]).decode('utf-8')
                 for i in range(count)]
    out_labels.append(every['labels'][p, :count])
    out_classes.append(every['classes'][p, :count])
    out_scores.append(every['scores'][p, :count])
  return (out_keys, np.concatenate(out_labels).astype(np.int64),
          np.concatenate(out_classes).astype(np.int64), np.concatenate(out_scores))


def write_predictions(path: str, result: multiview.EvalResult,
                      names: Optional[list[str]] = None) -> Optional[str]:
  """One predictions file (.csv or .jsonl) with every process's videos, written by process 0.

  Collective (see `gather_predictions`). Returns the path on process 0, else None.
  """
  keys, labels, classes, scores = gather_predictions(result)
  if jax.process_index() != 0:
    return None
  return reports.write_predictions(
      path, reports.prediction_rows(keys, labels, classes, scores, names))


def default_output_dir(checkpoint: str, kind: str, split: str, which: str) -> str:
  name = f'eval_{split}' if kind == 'params' else f'eval_{split}_{which}'
  return str(epath.Path(checkpoint) / name)


def evaluate_checkpoint(config: Any, checkpoint: str, *, which: str = 'latest',
                        output_dir: str = '', labels_file: str = '',
                        predictions_format: str = 'csv', progress: bool = True,
                        keep_scores: bool = False) -> multiview.EvalResult:
  """Load, check, evaluate the configured split on every device, write the reports."""
  from aim_jax import sharding
  import data_pipelines

  if predictions_format not in ('csv', 'jsonl'):
    raise errors.ConfigError("predictions format must be 'csv' or 'jsonl', got "
                             f'{predictions_format!r}')
  from data_pipelines import config as data_config
  data_config.check(config.data)
  data_config.views(config.data, config.eval.split)        # eval.split, its clips and crops
  run_config.positive_int(config, 'eval.batch_size', config.eval.batch_size)
  if output_dir and epath.Path(output_dir).exists() and not epath.Path(output_dir).is_dir():
    raise errors.ConfigError(f'--output_dir {output_dir} is a file, not a folder')
  params, ckpt_model, kind = checkpoints.load_checkpoint(checkpoint, which)
  model_cfg = run_config.merge_model_config(config.model, ckpt_model)
  names = reports.read_class_names(labels_file, model_cfg['num_classes']) if labels_file else None
  split = config.eval.split
  views = multiview.num_views(config.data, split)
  model, params, boxed = checkpoints.prepare_model(model_cfg, params)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.logical_axis_rules)
  param_sharding = sharding.logical_shardings(boxed, mesh, rules)
  processes = jax.process_count()
  per_process = math.ceil(config.eval.batch_size / processes)
  pipeline = data_pipelines.for_source(config.data.source)
  expected = pipeline.count_examples(config.data, split)
  logging.info('evaluating %s (%s) on split %r: %d videos x %d views, %d devices, mesh %s, '
               '%d videos per step per process', checkpoint, kind, split, expected, views,
               jax.device_count(), dict(mesh.shape), per_process)
  batches = pipeline.make_eval_dataset(
      config.data, split=split, batch_size=per_process,
      process_index=jax.process_index(), process_count=processes)

  # The step is traced under the global mesh and the logical rules, so the model's
  # activation constraints shard the folded (videos x views) batch like the input.
  with sharding.mesh_context(mesh, rules):
    result = multiview.evaluate(
        multiview.model_apply_fn(model), params, batches, num_classes=model_cfg['num_classes'],
        num_views=views, batch_size=per_process, mesh=mesh,
        average_clips=config.eval.average_clips, expected_count=expected, progress=progress,
        keep_scores=keep_scores, total_steps=math.ceil(expected / processes / per_process) or None,
        param_sharding=param_sharding)
  # The pipeline names what it dropped before decoding (file, key, reason) in `.stats`.
  stats = getattr(batches, 'stats', None)
  skipped = [dict(file=f, key=k, reason=r) for f, k, r in getattr(stats, 'named', [])]
  if result.metrics['num_skipped'] > 0:
    logging.warning('%d of %d videos were skipped by the input pipeline (unreadable or bad '
                    'label)%s', result.metrics['num_skipped'], expected,
                    ': ' + ', '.join(f'{s["key"]} ({s["reason"]})' for s in skipped[:10])
                    if skipped else '')

  if not result.metrics['num_evaluated']:
    field = f'data.{split}_files' if config.data.source == 'tfrecord' else 'data.source'
    raise errors.DataError(
        f'no video of split {split!r} was evaluated ({field}={config.data[field.split(".")[1]]!r}'
        f': {expected} expected, {result.metrics["num_skipped"]} skipped'
        + (f'; first: {skipped[0]["key"]} ({skipped[0]["reason"]})' if skipped else '')
        + '): nothing to report')
  out = epath.Path(output_dir or default_output_dir(checkpoint, kind, split, which))
  try:
    _write_reports(out, result, names, predictions_format, checkpoint, kind, which, split,
                   model_cfg, config, processes, mesh, skipped)
  except OSError as e:
    raise errors.DataError(f'cannot write the reports to {out}: {e.strerror or e}'
                           + (f' ({e.filename})' if e.filename else '')) from None
  logging.info('%s: %s', split, reports.format_metrics(result.metrics))
  logging.info('reports in %s', out)
  return result


def _write_reports(out: epath.Path, result: multiview.EvalResult, names: Optional[list[str]],
                   predictions_format: str, checkpoint: str, kind: str, which: str, split: str,
                   model_cfg: dict, config: Any, processes: int, mesh: Any,
                   skipped: list[dict]) -> None:
  write_predictions(str(out / f'predictions.{predictions_format}'), result, names)
  if jax.process_index() == 0:
    reports.write_summary(
        str(out / 'summary.json'), result.metrics, checkpoint=checkpoint, checkpoint_kind=kind,
        which=which if kind == 'workdir' else None, split=split, model=model_cfg,
        data=config.data.to_dict(), eval=config.eval.to_dict(),
        devices=jax.device_count(), processes=processes, mesh=dict(mesh.shape),
        skipped_named=skipped)
    reports.write_per_class(str(out / 'per_class.csv'),
                            reports.per_class_table(result.confusion, names))
    reports.plot_confusion(str(out / 'confusion.png'), result.confusion, names)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:arg]).',
                                  lock_config=True)
  checkpoints.define_checkpoint_flags()
  for name in ('checkpoint', 'which', 'labels'):   # listed by --help, not only --helpfull
    flags.declare_key_flag(name)
  flags.DEFINE_string('output_dir', '', 'Where reports go (default CHECKPOINT/eval_<split>, '
                      'or CHECKPOINT/eval_<split>_<which> for a training workdir).')
  flags.DEFINE_enum('predictions_format', 'csv', ['csv', 'jsonl'], 'Per-video predictions file.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar.')
  flags.mark_flags_as_required(['config'])
  return flags.FLAGS


def main(argv) -> None:
  from absl import flags
  errors.quiet_library_logs()
  from aim_jax import compile_cache, distributed
  distributed.maybe_initialize()
  fl = flags.FLAGS
  compile_cache.configure(fl.config)
  logging.debug('config:\n%s', fl.config)
  try:
    result = evaluate_checkpoint(fl.config, fl.checkpoint, which=fl.which,
                                 output_dir=fl.output_dir, labels_file=fl.labels,
                                 predictions_format=fl.predictions_format, progress=fl.progress)
  except errors.UserError as e:
    if errors.show_traceback():
      raise
    raise SystemExit(errors.report(e, 'evaluate')) from None
  logging.info('%s', compile_cache.usage().describe())
  if jax.process_index() == 0:
    print(reports.format_metrics(result.metrics), flush=True)


def run() -> None:
  from absl import app
  _define_flags()
  app.run(main, flags_parser=run_config.flags_parser('evaluate'))


if __name__ == '__main__':
  run()
