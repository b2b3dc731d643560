"""Annotation readers: the formats video data sets ship with -> a list of `Entry`.

* Kinetics-400/700 CSV: `label,youtube_id,time_start,time_end,split`; files are either the
  trimmed clips `ID_000010_000020.mp4` (the usual downloaders) or whole videos `ID.mp4`
  (then trimmed to [time_start, time_end] while decoding).
* Something-Something-v2 JSON: a list of {`id`, `template` with [brackets], ...} and the
  `labels.json` dict from bracket-free template to class index; files `ID.webm`.
* Diving-48 JSON: a list of {`vid_name`, `label`, ...}; files `VID_NAME.mp4`.
* Plain list: `relative/path label` per line (the mmaction2 "videos list"); the label is a
  class index, or a class name when a class list (`--labels`) maps names to indices (names
  may hold spaces; a tab between path and label is also accepted).
A label the class list does not know is an `Entry` with `error` set, reported, not written;
a line that cannot be read at all stops reading with an error naming the file and line.
"""

import csv
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.avi', '.mkv', '.mov', '.m4v')


@dataclasses.dataclass
class Entry:
  key: str                 # video id, stored as video/filename
  path: str                # video file ('' when not found)
  label: int
  label_text: str
  start_s: Optional[float] = None  # trim window (seconds) when reading an untrimmed video
  end_s: Optional[float] = None
  error: str = ''
  wanted: str = ''         # the file a list named, kept when it does not exist (for the report)


def index_videos(videos_dir: str) -> Dict[str, str]:
  """Stem (and relative path) -> file for every video under `videos_dir`."""
  out = {}
  for root, _, files in os.walk(videos_dir):
    for name in files:
      if name.lower().endswith(VIDEO_EXTENSIONS):
        full = os.path.join(root, name)
        out.setdefault(os.path.splitext(name)[0], full)
        out[os.path.relpath(full, videos_dir)] = full
  return out


def _read_lines(path: str) -> List[str]:
  with open(path) as f:
    return [row.strip() for row in f if row.strip()]


def read_class_names(path: str) -> List[str]:
  """One class name per line, or a JSON list, or a JSON {name: index} dict (SSv2 labels.json)."""
  if path.endswith('.json'):
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, dict):
      return [name for name, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
    return [str(x) for x in data]
  return _read_lines(path)


def kinetics(csv_path: str, videos: Dict[str, str],
             classes: Optional[Sequence[str]]) -> List[Entry]:
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  for field in ('youtube_id', 'time_start', 'time_end'):
    if rows and field not in rows[0]:
      raise ValueError(f'{csv_path}: Kinetics CSV needs column {field!r}, has {list(rows[0])}')
  has_label = bool(rows) and 'label' in rows[0]
  if classes is None:
    classes = sorted({r['label'] for r in rows}) if has_label else []
  lookup = {c: i for i, c in enumerate(classes)}
  out = []
  for row, r in enumerate(rows, start=2):  # line 1 is the header
    try:
      yid, t0, t1 = r['youtube_id'], int(float(r['time_start'])), int(float(r['time_end']))
    except (TypeError, ValueError) as e:
      raise ValueError(f'{csv_path}: line {row}: time_start/time_end must be seconds, got '
                       f'{r.get("time_start")!r}, {r.get("time_end")!r}') from e
    trimmed = f'{yid}_{t0:06d}_{t1:06d}'
    text = r['label'] if has_label else ''
    label = lookup.get(text, -1)
    e = Entry(key=trimmed, path='', label=label, label_text=text)
    if trimmed in videos:
      e.path = videos[trimmed]
    elif yid in videos:
      e.path, e.start_s, e.end_s = videos[yid], float(t0), float(t1)
    if label < 0:
      e.error = f'label {text!r} not in the class list'
    out.append(e)
  return out


def ssv2(json_path: str, labels_path: str, videos: Dict[str, str]) -> List[Entry]:
  with open(json_path) as f:
    items = json.load(f)
  with open(labels_path) as f:
    labels = {k: int(v) for k, v in json.load(f).items()}
  out = []
  for item in items:
    vid = str(item['id'])
    text = item.get('template', item.get('label', '')).replace('[', '').replace(']', '')
    label = labels.get(text, -1)
    e = Entry(key=vid, path=videos.get(vid, ''), label=label, label_text=text)
    if label < 0:
      e.error = f'template {text!r} not in {labels_path}'
    out.append(e)
  return out


def diving48(json_path: str, videos: Dict[str, str], num_classes: int) -> List[Entry]:
  with open(json_path) as f:
    items = json.load(f)
  out = []
  for i, item in enumerate(items):
    try:
      vid, label = str(item['vid_name']), int(item['label'])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{json_path}: item {i}: needs "vid_name" and an integer "label", got '
                       f'{item!r}') from e
    e = Entry(key=vid, path=videos.get(vid, ''), label=label, label_text=str(label))
    if not 0 <= label < num_classes:
      e.error = f'label {label} outside [0, {num_classes})'
    out.append(e)
  return out


def _is_int(text: str) -> bool:
  return text.lstrip('-').isdigit()


def _split_list_line(line: str, lookup: Dict[str, int]) -> Tuple[str, str]:
  """`path label` -> (path, label): a tab separates if present, else the last space, unless a
  longer tail of the line is a class name (names with spaces: `a b.mp4 playing guitar`)."""
  if '\t' in line:
    rel, _, label = line.rpartition('\t')
    return rel.strip(), label.strip()
  rel, _, label = line.rpartition(' ')
  if lookup and not _is_int(label):
    words = line.split(' ')
    for i in range(1, len(words)):
      if ' '.join(words[i:]) in lookup:
        return ' '.join(words[:i]), ' '.join(words[i:])
  return rel, label


def plain_list(list_path: str, videos_dir: str, num_classes: int,
               classes: Optional[Sequence[str]], labels_path: str = '') -> List[Entry]:
  """Entries of a `path label` list; labels are indices, or names of `classes`."""
  lookup = {c: i for i, c in enumerate(classes)} if classes else {}
  out = []
  with open(list_path) as f:
    lines = [(n, row.strip()) for n, row in enumerate(f, start=1) if row.strip()]
  for n, line in lines:
    rel, label_s = _split_list_line(line, lookup)
    if not rel:
      raise ValueError(f'{list_path}: line {n}: {line!r} is not "path label"')
    error = ''
    if _is_int(label_s):
      label = int(label_s)
      text = classes[label] if classes and 0 <= label < len(classes) else label_s
      if not 0 <= label < num_classes:
        error = f'label {label} outside [0, {num_classes})'
    elif lookup:
      label, text = lookup.get(label_s, -1), label_s
      if label < 0:
        error = f'label {label_s!r} not in the class list {labels_path}'.rstrip()
    else:
      raise ValueError(f'{list_path}: line {n}: label {label_s!r} is not a class index; to '
                       'use class names give --labels FILE (one class name per line; its line '
                       'order gives the indices)')
    path = rel if os.path.isabs(rel) else os.path.join(videos_dir, rel)
    key = os.path.splitext(rel)[0]
    e = Entry(key=key, path=path if os.path.exists(path) else '', label=label, label_text=text,
              error=error, wanted=path)
    out.append(e)
  return out


def detect_format(path: str) -> str:
  if path.endswith('.csv'):
    return 'kinetics'
  if path.endswith('.json'):
    with open(path) as f:
      items = json.load(f)
    if items and isinstance(items, list) and 'vid_name' in items[0]:
      return 'diving48'
    if items and isinstance(items, list) and 'template' in items[0]:
      return 'ssv2'
    raise ValueError(f'{path}: unknown JSON annotation format (need vid_name or template keys)')
  return 'list'


def read(fmt: str, annotations: str, videos_dir: str, *, labels: str = '',
         num_classes: int = 0) -> List[Entry]:
  """Entries of any supported format; `fmt='auto'` detects it from the file."""
  fmt = detect_format(annotations) if fmt == 'auto' else fmt
  classes = read_class_names(labels) if labels and fmt != 'ssv2' else None
  if not num_classes:
    num_classes = len(classes) if classes else (48 if fmt == 'diving48' else 1 << 30)
  if fmt == 'kinetics':
    return kinetics(annotations, index_videos(videos_dir), classes)
  if fmt == 'ssv2':
    if not labels:
      raise ValueError('Something-Something-v2 needs --labels labels.json')
    return ssv2(annotations, labels, index_videos(videos_dir))
  if fmt == 'diving48':
    return diving48(annotations, index_videos(videos_dir), num_classes)
  if fmt == 'list':
    return plain_list(annotations, videos_dir, num_classes, classes, labels)
  raise ValueError(f"--format must be auto, kinetics, ssv2, diving48 or list; got {fmt!r}")
