"""Training scalars as TensorBoard event files (`WORKDIR/tensorboard/events.out.tfevents.*`).

The file is what `tf.summary` and tensorboardX write: TFRecord framing (length, masked
CRC-32C of the length, data, masked CRC-32C of the data) around serialized `Event`
protocol buffers, the first one naming the file version, each next one a step's
`Summary.Value` with a `simple_value`. Written here in ~60 lines so a training process
imports neither TensorFlow (~2.4 s, and absent on accelerator images) nor tensorboardX
(which imports torch when it is installed).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from etils import epath

_COUNTER = itertools.count()


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1   # Castagnoli, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data
          + struct.pack('<I', _masked_crc(data)))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1                      # int64 fields: two's complement, as protobuf
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
  """A serialized `tensorflow.Event`: wall_time (1, double), step (2, int64), then
  file_version (3) or summary (5) of `Summary.Value`s: tag (1), simple_value (2, float, in
  a oneof: written even when 0). Proto3 leaves out a zero wall_time or step."""
  out = (b'\x09' + struct.pack('<d', wall_time) if wall_time else b'') + (
      b'\x10' + _varint(step) if step else b'')
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalars:
    values = b''.join(_field(1, _field(1, tag.encode()) + b'\x15' + struct.pack('<f', value))
                      for tag, value in scalars.items())
    out += _field(5, values)
  return out


class ScalarWriter:
  """`scalar(tag, value, step)`, `flush()`, `close()` over one TensorBoard log directory;
  each writer starts a new event file (a resumed run adds one, as TensorFlow's writer does)."""

  def __init__(self, logdir: str):
    directory = epath.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = (f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.'
            f'{next(_COUNTER)}.v2')
    self.path = directory / name
    self._file = self.path.open('wb')
    self._file.write(tfrecord(event(now, 0, file_version='brain.Event:2')))

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write(tfrecord(event(time.time(), int(step), scalars={tag: float(value)})))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
