"""Preparation: annotation formats, frame rate and short side, resume, parallel writers, CLI."""

import json
import os
import subprocess
import sys

import pytest

tf = pytest.importorskip('tensorflow')
pytest.importorskip('av')

from data_pipelines import annotations  # noqa: E402
from data_pipelines import prepare  # noqa: E402
from data_pipelines import records  # noqa: E402
from data_pipelines import video_io  # noqa: E402
from tests import data_helpers as h  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kinetics_csv_trimmed_and_untrimmed_files(tmp_path):
  vids = tmp_path / 'v'
  os.makedirs(vids / 'abseiling')
  (vids / 'abseiling' / 'aaa_000002_000012.mp4').write_bytes(b'x')
  (vids / 'bbb.mp4').write_bytes(b'x')
  csv = tmp_path / 'train.csv'
  csv.write_text('label,youtube_id,time_start,time_end,split\n'
                 'abseiling,aaa,2,12,train\n"air drumming",bbb,5,15,train\n'
                 'abseiling,ccc,0,10,train\n')
  entries = annotations.read('auto', str(csv), str(vids))
  assert [(e.key, e.label, e.label_text) for e in entries] == [
      ('aaa_000002_000012', 0, 'abseiling'), ('bbb_000005_000015', 1, 'air drumming'),
      ('ccc_000000_000010', 0, 'abseiling')]
  assert entries[0].path.endswith('aaa_000002_000012.mp4') and entries[0].start_s is None
  assert entries[1].path.endswith('bbb.mp4') and (entries[1].start_s, entries[1].end_s) == (5, 15)
  assert entries[2].path == ''  # missing video: reported by prepare
  # an explicit class list fixes the indices across splits; unknown names are errors
  (tmp_path / 'classes.txt').write_text('air drumming\nabseiling\n')
  entries = annotations.read('kinetics', str(csv), str(vids), labels=str(tmp_path / 'classes.txt'))
  assert [e.label for e in entries] == [1, 0, 1]


def test_ssv2_json_templates_and_labels_json(tmp_path):
  (tmp_path / 'labels.json').write_text(json.dumps(
      {'Holding something next to something': '0', 'Pushing something from left to right': '1'}))
  (tmp_path / 'train.json').write_text(json.dumps([
      {'id': '78687', 'label': 'holding potato next to vicks',
       'template': 'Holding [something] next to [something]', 'placeholders': ['potato', 'vicks']},
      {'id': '42326', 'template': 'Pushing [something] from left to right'},
      {'id': '1', 'template': 'Unknown [something]'}]))
  os.makedirs(tmp_path / 'v')
  (tmp_path / 'v' / '78687.webm').write_bytes(b'x')
  entries = annotations.read('auto', str(tmp_path / 'train.json'), str(tmp_path / 'v'),
                             labels=str(tmp_path / 'labels.json'))
  assert [(e.key, e.label) for e in entries] == [('78687', 0), ('42326', 1), ('1', -1)]
  assert entries[0].label_text == 'Holding something next to something'
  assert entries[0].path.endswith('78687.webm') and entries[1].path == ''
  assert 'not in' in entries[2].error


def test_diving48_json_and_plain_list(tmp_path):
  (tmp_path / 'd.json').write_text(json.dumps([
      {'vid_name': '-mmq0PT-u8k_00155', 'label': 0, 'start_frame': 0, 'end_frame': 184},
      {'vid_name': 'zzz_1', 'label': 48}]))
  entries = annotations.read('auto', str(tmp_path / 'd.json'), str(tmp_path))
  assert [(e.key, e.label, bool(e.error)) for e in entries] == [
      ('-mmq0PT-u8k_00155', 0, False), ('zzz_1', 48, True)]
  os.makedirs(tmp_path / 'a')
  (tmp_path / 'a' / 'my clip.mp4').write_bytes(b'x')
  (tmp_path / 'l.txt').write_text('a/my clip.mp4 2\n')
  e, = annotations.read('auto', str(tmp_path / 'l.txt'), str(tmp_path), num_classes=5)
  assert (e.key, e.label, e.path.endswith('my clip.mp4')) == ('a/my clip', 2, True)


def test_decode_short_side_fps_and_trim(tmp_path):
  path = h.make_video(str(tmp_path / 'v.mp4'), 50, height=60, width=80, fps=25)
  frames = list(video_io.decode_video(path, short_side=30))
  assert len(frames) == 50 and frames[0].shape == (30, 40, 3)
  assert [h.frame_index(f[..., 0].mean()) for f in frames[:4]] == [0, 1, 2, 3]
  ten = list(video_io.decode_video(path, fps=10))  # 2 s at 25 fps -> 20 frames at 10 fps
  assert len(ten) == 20
  idx = [h.frame_index(f[..., 0].mean()) for f in ten]
  assert idx[:5] == [0, 3, 5, 8, 10]  # frames at t >= 0, .1, .2, .3, .4 s (25 fps: 0,2.5,5,...)
  trimmed = list(video_io.decode_video(path, start_s=1.0, end_s=1.4))
  assert [h.frame_index(f[..., 0].mean()) for f in trimmed] == list(range(25, 35))


def _list_dataset(tmp_path, n):
  vids = tmp_path / 'vids'
  os.makedirs(vids, exist_ok=True)
  for k in range(n):
    h.make_video(str(vids / f'v{k}.mp4'), 6 + k, height=32, width=48)
  (tmp_path / 'list.txt').write_text(''.join(f'v{k}.mp4 {k % 2}\n' for k in range(n)))
  return annotations.read('list', str(tmp_path / 'list.txt'), str(vids), num_classes=2)


def test_resume_redoes_only_incomplete_shards(tmp_path):
  entries = _list_dataset(tmp_path, 6)
  out = str(tmp_path / 'out')
  kw = dict(out_dir=out, name='r', split='train', opts=prepare.Options(short_side=32),
            num_shards=3, progress=False)
  first = prepare.prepare(entries, **kw)
  shards = [os.path.join(out, records.shard_name('r', 'train', i, 3)) for i in range(3)]
  mtimes = [os.path.getmtime(p) for p in shards]
  # interruption: shard 1 was left as a temporary file without its JSON
  os.replace(shards[1], shards[1] + '.tmp')
  os.remove(prepare.shard_meta_path(shards[1]))
  second = prepare.prepare(entries, **kw)
  assert [os.path.getmtime(p) for p in (shards[0], shards[2])] == [mtimes[0], mtimes[2]]
  assert os.path.exists(shards[1]) and not os.path.exists(shards[1] + '.tmp')
  assert second['videos_written'] == first['videos_written'] == 6
  assert second['frames'] == sum(6 + k for k in range(6))
  # different options (another short side) invalidate the finished shards
  kw['opts'] = prepare.Options(short_side=16)
  prepare.prepare(entries, **kw)
  assert os.path.getmtime(shards[0]) != mtimes[0]


@pytest.mark.slow
def test_cli_parallel_workers_with_report(tmp_path):
  _list_dataset(tmp_path, 4)
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'data_pipelines.prepare', f'--videos={tmp_path / "vids"}',
         f'--annotations={tmp_path / "list.txt"}', f'--out={out}', '--split=val',
         '--num_classes=2', '--short_side=32', '--num_shards=2', '--num_workers=2', '--name=cli']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  with open(out / 'cli-val.report.json') as f:
    report = json.load(f)
  assert report['videos_written'] == 4 and report['num_shards'] == 2
  assert sorted(report['shards']) == ['cli-val.tfrecord-00000-of-00002',
                                      'cli-val.tfrecord-00001-of-00002']
  assert all(s['complete'] for s in report['shards'].values())


def test_plain_list_class_names_with_labels_file(tmp_path):
  os.makedirs(tmp_path / 'v')
  for name in ('a.mp4', 'my clip.mp4', 'c.mp4', 'd.mp4'):
    (tmp_path / 'v' / name).write_bytes(b'x')
  (tmp_path / 'classes.txt').write_text('jumping\nplaying guitar\nswimming\n')
  (tmp_path / 'l.txt').write_text('a.mp4 jumping\nmy clip.mp4 playing guitar\n'
                                  'c.mp4\tswimming\nd.mp4 2\nd.mp4 dancing\n')
  entries = annotations.read('list', str(tmp_path / 'l.txt'), str(tmp_path / 'v'),
                             labels=str(tmp_path / 'classes.txt'))
  assert [(e.key, e.label, e.label_text, e.error) for e in entries[:4]] == [
      ('a', 0, 'jumping', ''), ('my clip', 1, 'playing guitar', ''), ('c', 2, 'swimming', ''),
      ('d', 2, 'swimming', '')]
  assert entries[4].label == -1 and "'dancing' not in the class list" in entries[4].error
  # without a class list a name cannot be mapped: one error naming file and line
  with pytest.raises(ValueError, match=r"l\.txt: line 1: label 'jumping' is not a class "
                                       r'index.*--labels'):
    annotations.read('list', str(tmp_path / 'l.txt'), str(tmp_path / 'v'), num_classes=3)


def test_annotation_rows_that_cannot_be_read_name_file_and_line(tmp_path):
  csv = tmp_path / 'k.csv'
  csv.write_text('label,youtube_id,time_start,time_end,split\na,x,0,10,train\na,y,start,10,train\n')
  with pytest.raises(ValueError, match=r'k\.csv: line 3: time_start/time_end'):
    annotations.read('kinetics', str(csv), str(tmp_path))
  (tmp_path / 'd.json').write_text(json.dumps([{'vid_name': 'a', 'label': 1},
                                               {'vid_name': 'b', 'label': 'back dive'}]))
  with pytest.raises(ValueError, match=r'd\.json: item 1: needs "vid_name" and an integer'):
    annotations.read('diving48', str(tmp_path / 'd.json'), str(tmp_path))


def _prepare_cli(tmp_path, *args):
  cmd = [sys.executable, '-m', 'data_pipelines.prepare', f'--out={tmp_path / "out"}',
         '--split=train', '--num_classes=2', '--short_side=32', '--num_workers=1', *args]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_bad_folders_and_annotation_files_are_one_line_errors(tmp_path):
  _list_dataset(tmp_path, 2)
  (tmp_path / 'names.txt').write_text('v0.mp4 walking\n')
  cases = [
      ((f'--videos={tmp_path / "nope"}', f'--annotations={tmp_path / "list.txt"}'),
       f'prepare: DataError: --videos {tmp_path / "nope"}: no such folder'),
      ((f'--videos={tmp_path / "vids"}', f'--annotations={tmp_path / "missing.txt"}'),
       f'prepare: DataError: {tmp_path / "missing.txt"}: No such file or directory'),
      ((f'--videos={tmp_path / "vids"}', f'--annotations={tmp_path / "names.txt"}'),
       f"prepare: DataError: {tmp_path / 'names.txt'}: line 1: label 'walking' is not a class "
       'index'),
  ]
  for args, want in cases:
    res = _prepare_cli(tmp_path, *args)
    assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(want), res.stderr[-500:]
  assert not (tmp_path / 'out').exists()                 # nothing written for these


def test_cli_writing_no_video_at_all_fails_and_names_what_it_looked_for(tmp_path):
  _list_dataset(tmp_path, 2)
  os.makedirs(tmp_path / 'elsewhere')                    # --videos: the wrong folder
  res = _prepare_cli(tmp_path, f'--videos={tmp_path / "elsewhere"}',
                     f'--annotations={tmp_path / "list.txt"}')
  assert res.returncode == 2, res.stderr[-2000:]
  missing = tmp_path / 'elsewhere' / 'v0.mp4'
  assert f'FAILED v0 ({missing}): FileNotFoundError: video file {missing} does not exist' \
      in res.stdout
  assert res.stderr.strip().splitlines()[-1].startswith(
      f'prepare: DataError: none of the 2 videos of {tmp_path / "list.txt"} was written')
  with open(tmp_path / 'out' / 'list-train.report.json') as f:
    report = json.load(f)
  assert {x['path'] for x in report['failures']} == {str(missing),
                                                      str(tmp_path / 'elsewhere' / 'v1.mp4')}


def _listing(d):
  """{name: (size, mtime)} of every file in `d`, hidden ones included."""
  return {n: (os.path.getsize(d / n), os.path.getmtime(d / n)) for n in sorted(os.listdir(d))}


def test_shards_of_another_count_stop_a_run_before_it_writes(tmp_path):
  from aim_jax import errors
  entries = _list_dataset(tmp_path, 3)
  out = tmp_path / 'out'
  kw = dict(out_dir=str(out), name='r', split='train', opts=prepare.Options(short_side=32),
            progress=False)
  prepare.prepare(entries[:2], num_shards=4, **kw)       # 2 videos: 2 shards
  before = _listing(out)
  assert {n for n in before if 'tfrecord' in n} == {
      f'{dot}r-train.tfrecord-0000{i}-of-00002{ext}' for i in range(2)
      for dot, ext in (('', ''), ('.', '.json'), ('.', '.frames'))}
  # another --num_shards, or another number of videos under the same one: another count
  for part, shards, writes in ((entries[:2], 1, 1), (entries, 4, 3)):
    with pytest.raises(errors.DataError) as e:
      prepare.prepare(part, num_shards=shards, **kw)
    assert str(e.value) == (
        f'{out} holds 2 shard(s) of r-train with another shard count '
        f'(r-train.tfrecord-00000-of-00002, 2 shards; this run writes {writes}): remove them or '
        'give another --out or --name')
    assert _listing(out) == before                      # nothing written, nothing removed
  # the same count resumes; other splits and names are not in the way, nor in its way
  assert prepare.prepare(entries[:2], num_shards=2, **kw)['videos_written'] == 2
  assert _listing(out) == {**before, 'r-train.report.json': _listing(out)['r-train.report.json']}
  prepare.prepare(entries, num_shards=3, **dict(kw, split='val'))
  prepare.prepare(entries, num_shards=1, **dict(kw, name='r2'))
  shards = lambda listing: {n: v for n, v in listing.items() if 'r-train.tfrecord' in n}
  assert len(shards(before)) == 6 and shards(_listing(out)) == shards(before)
  assert len([n for n in os.listdir(out) if n.startswith('r-val.tfrecord-')]) == 3
  # a file where the output folder should be
  (tmp_path / 'afile').write_text('mine')
  with pytest.raises(errors.DataError, match=f'{tmp_path / "afile"}: not a folder'):
    prepare.prepare(entries, num_shards=1, **dict(kw, out_dir=str(tmp_path / 'afile')))
  assert (tmp_path / 'afile').read_text() == 'mine'


def test_cli_shards_of_another_count_and_an_out_file_are_one_line_errors(tmp_path):
  _list_dataset(tmp_path, 2)
  args = (f'--videos={tmp_path / "vids"}', f'--annotations={tmp_path / "list.txt"}', '--name=k')
  res = _prepare_cli(tmp_path, *args, '--num_shards=1')
  assert res.returncode == 0, res.stderr[-2000:]
  out = tmp_path / 'out'
  before = _listing(out)
  res = _prepare_cli(tmp_path, *args, '--num_shards=2')
  assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1] == (
      f'prepare: DataError: {out} holds 1 shard(s) of k-train with another shard count '
      '(k-train.tfrecord-00000-of-00001, 1 shards; this run writes 2): remove them or give '
      'another --out or --name')
  assert _listing(out) == before and res.stdout == ''
  # --out names a file: one line naming it, the file untouched
  (tmp_path / 'afile').write_text('mine')
  res = _prepare_cli(tmp_path, *args, f'--out={tmp_path / "afile"}')
  assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1] == (
      f'prepare: DataError: --out {tmp_path / "afile"}: not a folder (a file of that name '
      'exists)')
  assert (tmp_path / 'afile').read_text() == 'mine'


@pytest.mark.parametrize('flag,value,want', [
    ('short_side', '-5', '--short_side=-5: must be >= 0 (0 keeps the original size)'),
    ('fps', '-1', '--fps=-1.0: must be >= 0 (0 keeps every frame)'),
    ('num_workers', '-1', '--num_workers=-1: must be >= 0 (0 writes in this process)'),
    ('num_shards', '-1', '--num_shards=-1: must be >= 0 (0: one per 200 videos)'),
    ('min_frames', '-1', '--min_frames=-1: must be >= 1'),
    ('num_classes', '-3', '--num_classes=-3: must be >= 0 (0: from --labels)'),
    ('warn_frames', '-1', '--warn_frames=-1: must be >= 0 (0 warns of no short video)'),
    ('jpeg_quality', '0', '--jpeg_quality=0: must be from 1 to 100'),
    ('jpeg_quality', '101', '--jpeg_quality=101: must be from 1 to 100'),
])
def test_cli_out_of_range_flags_stop_before_anything_is_read_or_written(tmp_path, flag, value,
                                                                        want):
  _list_dataset(tmp_path, 1)
  res = _prepare_cli(tmp_path, f'--videos={tmp_path / "vids"}',
                     f'--annotations={tmp_path / "list.txt"}', f'--{flag}={value}')
  assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert res.stderr.strip().splitlines() == [f'prepare: ConfigError: {want}']
  assert not (tmp_path / 'out').exists()


def test_flag_ranges_accept_their_bounds_and_reject_what_is_not_a_number():
  for flag, value in (('short_side', 0), ('fps', 0.0), ('fps', 29.97), ('num_workers', 0),
                      ('num_shards', 0), ('min_frames', 1), ('jpeg_quality', 1),
                      ('jpeg_quality', 100)):
    assert prepare.flag_range_error(flag, value) == '', (flag, value)
  assert prepare.flag_range_error('fps', float('nan')) == (
      '--fps=nan: must be >= 0 (0 keeps every frame)')
  assert prepare.flag_range_error('fps', float('inf')).startswith('--fps=inf: must be >= 0')
