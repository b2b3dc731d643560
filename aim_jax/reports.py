"""Evaluation reports: per-video predictions, a JSON summary, per-class tables.

Files (all through etils.epath, so local paths and gs:// both work):
  predictions.csv | predictions.jsonl   video id, label, top-k classes and scores
  summary.json                          metrics plus run information
  per_class.csv                         per class: name, videos, correct, accuracy
  confusion.png                         confusion matrix (up to MAX_PLOT_CLASSES)

The demo reuses these functions on its own results.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from etils import epath

from aim_jax import errors

# Beyond this many classes a confusion-matrix image is unreadable (K700 would be 700x700 cells).
MAX_PLOT_CLASSES = 400


def read_class_names(path: str, num_classes: Optional[int] = None) -> list[str]:
  """One class name per line (blank lines ignored); checks the count against the head.

  Also accepts 'index name' or 'index,name' lines (the Kinetics label-map
  style) when every line starts with its own index.
  """
  p = epath.Path(path)
  if not p.exists():
    raise errors.DataError(f'labels file {path} does not exist')
  lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
  indexed = []
  for i, ln in enumerate(lines):
    head, sep, rest = ln.replace(',', ' ', 1).partition(' ')
    if not (sep and head.isdigit() and int(head) == i):
      indexed = None
      break
    indexed.append(rest.strip())
  names = indexed if indexed else lines
  if num_classes is not None and len(names) != num_classes:
    raise errors.DataError(f'labels file {path} has {len(names)} class names but the model '
                           f'head has {num_classes} classes')
  return names


def class_name(names: Optional[Sequence[str]], index: int) -> str:
  return names[index] if names is not None else str(int(index))


def prediction_rows(keys: Sequence[str], labels: np.ndarray, topk_classes: np.ndarray,
                    topk_scores: np.ndarray, names: Optional[Sequence[str]] = None
                    ) -> list[dict]:
  """One dict per video: id, label, correct (top-1), top-k classes, names and scores."""
  rows = []
  for key, label, classes, scores in zip(keys, labels, topk_classes, topk_scores):
    rows.append(dict(
        video_id=key, label=int(label), label_name=class_name(names, label),
        correct=bool(classes[0] == label),
        topk_classes=[int(c) for c in classes],
        topk_names=[class_name(names, c) for c in classes],
        topk_scores=[round(float(s), 6) for s in scores]))
  return rows


def write_predictions(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """CSV (one column per rank) or JSONL, chosen by the file suffix."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if p.suffix == '.jsonl':
    p.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(p)
  if p.suffix != '.csv':
    raise ValueError(f'predictions file {path}: suffix must be .csv or .jsonl')
  k = max((len(r['topk_classes']) for r in rows), default=0)
  header = ['video_id', 'label', 'label_name', 'correct']
  for i in range(1, k + 1):
    header += [f'top{i}_class', f'top{i}_name', f'top{i}_score']
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  for r in rows:
    line = [r['video_id'], r['label'], r['label_name'], int(r['correct'])]
    for c, n, s in zip(r['topk_classes'], r['topk_names'], r['topk_scores']):
      line += [c, n, s]
    w.writerow(line)
  p.write_text(buf.getvalue())
  return str(p)


def read_predictions(path: str) -> list[dict]:
  """Inverse of write_predictions (CSV values come back as strings but for the lists)."""
  p = epath.Path(path)
  if p.suffix == '.jsonl':
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
  rows = []
  for r in csv.DictReader(io.StringIO(p.read_text())):
    k = sum(1 for c in r if c.endswith('_class'))
    rows.append(dict(video_id=r['video_id'], label=int(r['label']), label_name=r['label_name'],
                     correct=bool(int(r['correct'])),
                     topk_classes=[int(r[f'top{i}_class']) for i in range(1, k + 1)],
                     topk_names=[r[f'top{i}_name'] for i in range(1, k + 1)],
                     topk_scores=[float(r[f'top{i}_score']) for i in range(1, k + 1)]))
  return rows


def _clean(x: Any) -> Any:
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, (np.floating, np.integer)):
    return _clean(x.item())
  if isinstance(x, Mapping):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def write_summary(path: str, metrics: Mapping[str, Any], **info: Any) -> str:
  """metrics plus run information (checkpoint, config name, split...) as JSON."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(json.dumps(_clean({'metrics': dict(metrics), **info}), indent=2, default=str))
  return str(p)


def per_class_table(confusion: np.ndarray, names: Optional[Sequence[str]] = None) -> list[dict]:
  """Per class (rows of the confusion matrix = labels): videos, correct, accuracy,
  and the class it is most often mistaken for."""
  rows = []
  for c in range(confusion.shape[0]):
    total = int(confusion[c].sum())
    correct = int(confusion[c, c])
    off = confusion[c].copy()
    off[c] = 0
    confused = int(off.argmax()) if off.sum() else -1
    rows.append(dict(
        class_index=c, class_name=class_name(names, c), videos=total, correct=correct,
        accuracy=round(correct / total, 6) if total else None,
        most_confused_with=class_name(names, confused) if confused >= 0 else '',
        most_confused_count=int(off[confused]) if confused >= 0 else 0))
  return rows


def write_per_class(path: str, table: Sequence[Mapping[str, Any]]) -> str:
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  buf = io.StringIO()
  fields = list(table[0].keys()) if table else ['class_index']
  w = csv.DictWriter(buf, fieldnames=fields)
  w.writeheader()
  for r in table:
    w.writerow({k: ('' if v is None else v) for k, v in r.items()})
  p.write_text(buf.getvalue())
  return str(p)


def plot_confusion(path: str, confusion: np.ndarray, names: Optional[Sequence[str]] = None,
                   normalize: bool = True, title: str = '') -> Optional[str]:
  """Confusion-matrix PNG (rows normalised to recall); None above MAX_PLOT_CLASSES."""
  k = confusion.shape[0]
  if k > MAX_PLOT_CLASSES:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  m = confusion.astype(np.float64)
  if normalize:
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
  size = min(4 + 0.12 * k, 40)
  fig, ax = plt.subplots(figsize=(size, size), dpi=100)
  im = ax.imshow(m, cmap='Blues', vmin=0, vmax=1 if normalize else None,
                 interpolation='nearest')
  ax.set_xlabel('predicted')
  ax.set_ylabel('label')
  ax.set_title(title or f'confusion matrix ({k} classes{", row-normalised" if normalize else ""})')
  if k <= 60:
    labels = [class_name(names, i) for i in range(k)]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
  if k <= 20:
    for i in range(k):
      for j in range(k):
        if confusion[i, j]:
          ax.text(j, i, str(int(confusion[i, j])), ha='center', va='center', fontsize=7,
                  color='white' if m[i, j] > 0.5 * (m.max() or 1) else 'black')
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  plt.close(fig)
  p.write_bytes(buf.getvalue())
  return str(p)


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """One human line: accuracies in percent, counts, throughput."""
  def pct(key):
    value = metrics[key]
    return f'{100 * value:.2f}' if value == value else 'nan'   # nan != nan

  return (f'top1 {pct("top1")}  top5 {pct("top5")}  mean-class {pct("mean_class_accuracy")}  '
          f'videos {metrics["num_evaluated"]} (skipped {metrics["num_skipped"]})  '
          f'views {metrics["num_views"]}  {metrics["clips_per_second"]:.1f} clips/s')
