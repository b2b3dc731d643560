"""Read PyTorch checkpoints as numpy arrays without running any of their code.

A `.pt`/`.pth`/`.bin` file is a pickle, and unpickling can call any Python
function the file names: a checkpoint from the internet is untrusted input.
This module reads the tensors itself, with no torch import:

  * safetensors (`.safetensors`): the JSON header and raw bytes (preferred);
  * torch zip archives (`torch.save` since 1.6, what HF `pytorch_model.bin`,
    OpenCLIP and mmaction2 write): `*/data.pkl` through a restricted unpickler
    that only knows tensor rebuilding, containers and a few data-only numpy
    constructors, and the raw storages `*/data/<key>`;
  * TorchScript archives (`torch.jit.save`, e.g. OpenAI's `ViT-B-16.pt`): the
    same zip layout, where the pickled objects are `__torch__.*` module classes.
    Those become inert `ScriptModuleState` records (attributes only; the
    archive's `code/` is never read), flattened to state-dict names;
  * the legacy (pre-1.6) pickle stream: through `torch.load(weights_only=True)`
    when torch is installed.

Any other global in a pickle (`os.system`, `builtins.eval`, a user class) is
refused with `UnsafeCheckpointError`, naming the global; a short file gives
`TruncatedCheckpointError`.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from aim_jax.errors import UserError


class CheckpointReadError(UserError):
  """A checkpoint file that cannot be read; the message names the file."""


class UnsafeCheckpointError(CheckpointReadError):
  """The pickle asks for a global that could run code: refused, never imported."""


class TruncatedCheckpointError(CheckpointReadError):
  """The file ends before the data its own header promises (partial download?)."""


def _bfloat16():
  import ml_dtypes  # a jax dependency
  return ml_dtypes.bfloat16


# torch storage classes / dtype names -> numpy dtype (callables for lazily imported ones).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': _bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_TORCH_DTYPES = {
    'float32': np.float32, 'float': np.float32, 'float64': np.float64, 'double': np.float64,
    'float16': np.float16, 'half': np.float16, 'bfloat16': _bfloat16, 'int64': np.int64,
    'long': np.int64, 'int32': np.int32, 'int': np.int32, 'int16': np.int16, 'int8': np.int8,
    'uint8': np.uint8, 'bool': np.bool_,
}
_SAFETENSORS_DTYPES = {
    'F32': np.float32, 'F64': np.float64, 'F16': np.float16, 'BF16': _bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def _np_dtype(d):
  return np.dtype(d() if callable(d) and not isinstance(d, type) else d)


class _StorageType:
  """Stands for `torch.FloatStorage` & co: only carries the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _TorchDtype:
  def __init__(self, name: str):
    self.dtype = _np_dtype(_TORCH_DTYPES[name])


class ScriptModuleState:
  """An inert record of one pickled TorchScript module (`__torch__.*`): its attributes.

  The unpickler creates it with `__new__` only (NEWOBJ) and fills `attributes`
  from the pickled state (BUILD); no method of the archive's code is involved.
  """
  qualified_name = '__torch__'
  attributes: Mapping = {}   # replaced (never mutated) by __setstate__

  def __setstate__(self, state):
    self.attributes = state if isinstance(state, dict) else {'__state__': state}

  def __repr__(self):
    return f'ScriptModuleState({self.qualified_name})'


def _script_class(qualified_name: str):
  return type('ScriptModule', (ScriptModuleState,), {'qualified_name': qualified_name})


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""
  flat, origin = storage
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    # A 0-d tensor (CLIP's logit_scale, a TorchScript archive's input_resolution) stays a
    # 0-d array, as safetensors gives it, so state dicts keep it and reports name it.
    return np.array(flat[offset])
  span = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
  if offset + span > flat.size:
    raise TruncatedCheckpointError(
        f'{origin}: tensor of shape {size} needs {offset + span} elements, the storage has '
        f'{flat.size} (file truncated?)')
  item = flat.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * item for s in stride))
  return np.array(view, order="C")        # own, contiguous memory


def _rebuild_parameter(data, requires_grad=None, hooks=None, *unused):
  return data


def _identity(x, *unused):
  return x


def _restore_type_tag(value, type_str):
  return value


def _numpy_scalar(dtype, data=None):
  return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


def _codecs_encode(text, encoding='utf-8'):
  return text.encode(encoding)


def _np_reconstruct():
  try:
    from numpy._core.multiarray import _reconstruct
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
  return _reconstruct


def _safe_globals() -> dict[tuple[str, str], Any]:
  """The only globals a checkpoint pickle may name: data, never behaviour."""
  g = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor'): lambda s, o, size, stride: _rebuild_tensor(
          s, o, size, stride),
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch.jit._pickle', 'restore_type_tag'): _restore_type_tag,
      ('torch.jit._pickle', 'build_intlist'): _identity,
      ('torch.jit._pickle', 'build_doublelist'): _identity,
      ('torch.jit._pickle', 'build_boollist'): _identity,
      ('torch.jit._pickle', 'build_tensorlist'): _identity,
      ('torch.jit._pickle', 'build_strlist'): _identity,
      ('torch', 'Size'): tuple,
      ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
      ('builtins', 'slice'): slice, ('builtins', 'complex'): complex,
      ('_codecs', 'encode'): _codecs_encode,
      # numpy scalars and arrays in mmcv `meta` (e.g. hook_msgs best_score): data only.
      ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
      ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
      ('numpy', 'dtype'): np.dtype,
      ('numpy.core.multiarray', '_reconstruct'): _np_reconstruct(),
      ('numpy._core.multiarray', '_reconstruct'): _np_reconstruct(),
      ('numpy', 'ndarray'): np.ndarray,
  }
  for name in _STORAGE_DTYPES:
    g[('torch', name)] = _StorageType(name)
  for name in _TORCH_DTYPES:
    g[('torch', name)] = _TorchDtype(name)
  return g


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals from an allow-list only; `__torch__.*` become inert records."""

  def __init__(self, file, origin: str, load_storage, allow_script: bool):
    super().__init__(file)
    self._origin = origin
    self._load_storage = load_storage
    self._allow_script = allow_script
    self._globals = _safe_globals()

  def find_class(self, module, name):
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    if self._allow_script and (module == '__torch__' or module.startswith('__torch__.')):
      return _script_class(f'{module}.{name}')
    raise UnsafeCheckpointError(
        f'{self._origin}: refusing to load global {module}.{name}: a checkpoint pickle may only '
        'contain tensors and plain containers (this one could run code on load). If you trust '
        'the file, re-save its state dict with torch.save(sd) or safetensors.')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise UnsafeCheckpointError(f'{self._origin}: unknown persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid[:5]
    # Typed storage classes (torch.FloatStorage) or, in newer files, a dtype.
    if isinstance(storage_type, (_TorchDtype, _StorageType)):
      dtype = storage_type.dtype
    else:
      raise UnsafeCheckpointError(f'{self._origin}: storage of unknown type {storage_type!r}')
    return self._load_storage(str(key), dtype, int(numel))


def _zip_prefix(names: list[str], path: str) -> str:
  pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
  if not pkl:
    raise CheckpointReadError(f'{path}: a zip file without data.pkl is not a torch checkpoint')
  return pkl[0][:-len('data.pkl')]


def _read_zip(path: str) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise TruncatedCheckpointError(
        f'{path}: not a complete zip archive ({e}); the file is truncated or corrupt') from e
  with archive:
    names = archive.namelist()
    prefix = _zip_prefix(names, path)
    is_script = any(n.startswith(prefix + 'code/') for n in names)

    def load_storage(key, dtype, numel):
      member = f'{prefix}data/{key}'
      try:
        raw = archive.read(member)
      except KeyError as e:
        raise TruncatedCheckpointError(f'{path}: storage {member} is missing') from e
      except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise TruncatedCheckpointError(f'{path}: storage {member} is unreadable ({e})') from e
      if len(raw) < numel * dtype.itemsize:
        raise TruncatedCheckpointError(
            f'{path}: storage {member} has {len(raw)} bytes, needs {numel * dtype.itemsize}')
      return np.frombuffer(raw, dtype=dtype, count=numel), f'{path}:{member}'

    try:
      with archive.open(prefix + 'data.pkl') as f:
        obj = _RestrictedUnpickler(f, path, load_storage, is_script).load()
    except (zipfile.BadZipFile, EOFError) as e:
      raise TruncatedCheckpointError(f'{path}: data.pkl is unreadable ({e})') from e
  return obj


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise TruncatedCheckpointError(f'{path}: {size} bytes, too short for a safetensors header')
    (n,) = struct.unpack('<Q', head)
    if 8 + n > size:
      raise TruncatedCheckpointError(f'{path}: header of {n} bytes but the file has {size}')
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointReadError(f'{path}: safetensors header is not JSON ({e})') from e
    data = f.read()
  if not isinstance(header, dict):
    raise CheckpointReadError(f'{path}: safetensors header is not a JSON object')
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    try:
      start, end = (int(o) for o in info['data_offsets'])
      dtype_name, shape = info['dtype'], [int(d) for d in info['shape']]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointReadError(
          f'{path}: tensor {key!r}: safetensors header entry {info!r} needs dtype, shape and '
          f'two data_offsets ({type(e).__name__}: {e})') from e
    if end > len(data):
      raise TruncatedCheckpointError(
          f'{path}: tensor {key!r} ends at byte {8 + n + end}, the file has {size} (truncated)')
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise CheckpointReadError(f'{path}: tensor {key!r} has unsupported dtype {dtype_name}')
    dtype = _np_dtype(_SAFETENSORS_DTYPES[dtype_name])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if start < 0 or end - start != want:
      raise CheckpointReadError(
          f'{path}: tensor {key!r}: shape {shape} of {dtype_name} needs {want} bytes, its '
          f'data_offsets [{start}, {end}] hold {end - start} (corrupt header)')
    out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
  return out


def _read_legacy(path: str) -> Any:
  """Pre-1.6 torch pickle stream: only via torch's own weights-only loader."""
  try:
    import torch
  except ImportError as e:
    raise CheckpointReadError(
        f'{path}: legacy (pre-1.6) torch format; reading it needs torch (pip install '
        '"aim-jax[convert]"), or re-save it as safetensors') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(f'{path}: refused by torch.load(weights_only=True): {e}') from e
  except (EOFError, RuntimeError) as e:
    raise TruncatedCheckpointError(f'{path}: cannot read ({e}); truncated or corrupt?') from e
  return _torch_to_numpy(obj)


def _torch_to_numpy(obj):
  import torch
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return t.float().numpy().astype(_np_dtype(_bfloat16)) if t.dtype == torch.bfloat16 \
        else t.numpy().copy()
  if isinstance(obj, Mapping):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_torch_to_numpy(v) for v in obj)
  return obj


def load(path: str) -> Any:
  """The checkpoint's top-level object, tensors as numpy arrays, no code run.

  TorchScript archives give their root `ScriptModuleState`; see `state_dict_of`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointReadError(f'{path}: no such file')
  if os.path.isdir(path):
    raise CheckpointReadError(f'{path} is a directory: pass the weights file inside it '
                              '(model.safetensors or pytorch_model.bin)')
  with open(path, 'rb') as f:
    magic = f.read(8)
  if not magic:
    raise TruncatedCheckpointError(f'{path}: empty file')
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  if magic[:2] == b'PK':
    return _read_zip(path)
  if magic[:1] == b'\x80':
    return _read_legacy(path)
  # A safetensors file under another name: an 8-byte length and then '{'.
  with open(path, 'rb') as f:
    f.seek(8)
    if f.read(1) == b'{':
      return _read_safetensors(path)
  raise CheckpointReadError(f'{path}: not a torch, TorchScript or safetensors checkpoint')


def state_dict_of(obj: Any, path: str = '<checkpoint>') -> dict[str, np.ndarray]:
  """A loaded checkpoint -> flat {name: array}.

  TorchScript module records are walked like `nn.Module.state_dict()` (their
  tensor attributes and submodules, dot-joined); dicts are returned as they are.
  """
  if isinstance(obj, ScriptModuleState):
    out = {}

    def walk(mod, prefix):
      for name, value in mod.attributes.items():
        if isinstance(value, np.ndarray):
          out[prefix + name] = value
        elif isinstance(value, ScriptModuleState):
          walk(value, f'{prefix}{name}.')

    walk(obj, '')
    return out
  if isinstance(obj, Mapping):
    return dict(obj)
  raise CheckpointReadError(f'{path}: top-level object is {type(obj).__name__}, not a state dict')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """`load` + `state_dict_of`."""
  return state_dict_of(load(path), path)


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Write `{'state_dict': ...}`-style nested dicts of arrays with torch.save (export)."""
  try:
    import torch
  except ImportError as e:
    raise CheckpointReadError(
        f'writing {path} needs torch (pip install "aim-jax[convert]")') from e

  def to_torch(x):
    if isinstance(x, np.ndarray):
      return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Mapping):
      return collections.OrderedDict((k, to_torch(v)) for k, v in x.items())
    return x

  torch.save(to_torch(state_dict), path)
