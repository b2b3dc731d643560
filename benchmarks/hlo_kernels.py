"""The kernels of a compiled XLA program, read from its optimised HLO text.

`compiled.as_text()` of a GPU (or CPU) executable lists, in its entry computation
and in the bodies of its while loops, every operation that launches a kernel:
fusions (`loop_add_fusion.3`, `input_transpose_fusion.50`, `gemm_fusion_dot.868`),
custom calls (cuDNN attention and convolutions, cuBLAS, Pallas/Triton kernels)
and the few unfused operations (copies, collectives). For each launch this reads
the bytes it moves (operands + results: the memory traffic of a kernel that
streams its inputs once), the FLOPs of the matrix products inside it, how often
it runs (while loops with a known trip count: `scan_layers`), its kernel family
(the names and families of `benchmarks.profile_kernels`, so a prediction and a
profile line up row by row) and where in the model it comes from (the module
path in the op metadata, forward or backward).

On a GPU, identical fusions are compiled once and every launch is named after one
of them in a profiler trace; `group` joins the launches that share a compiled
kernel the same way, so a measured kernel time can be matched to all its launches.

`predict_ms` turns bytes and FLOPs into a roofline estimate per launch, with the
per-family rates of `RATES` (an H200, calibrated on a measured profile of this
project's train step, see BENCHMARKS.md). Nothing here needs a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import re
from typing import Iterable, Mapping, Optional

from benchmarks import profile_kernels

ITEM_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
              'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
              'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 0.5, 'u4': 0.5}
_ARRAY = re.compile(r'\b(' + '|'.join(sorted(ITEM_BYTES, key=len, reverse=True)) +
                    r')\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Operations that launch nothing on a GPU.
_FREE = frozenset({'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
                   'after-all', 'partition-id', 'replica-id', 'opt-barrier', 'add-dependency',
                   'domain'})
_COLLECTIVES = frozenset({'all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                          'collective-permute', 'all-reduce-start', 'all-gather-start',
                          'collective-permute-start', 'all-reduce-done', 'all-gather-done',
                          'collective-permute-done'})


def shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every array in an HLO shape string (a tuple gives several): (dtype, dims)."""
  return [(dt, tuple(int(d) for d in dims.split(',') if d))
          for dt, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
  return _arrays_bytes(shape_dims(shape))


def _arrays_bytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
  return int(sum(math.prod(dims) * ITEM_BYTES[dt] for dt, dims in arrays))


def shape_elements(shape: str) -> int:
  """Elements of the (first) array of an HLO shape string; 0 for none."""
  arrays = shape_dims(shape)
  return math.prod(arrays[0][1]) if arrays else 0


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  op: str
  rest: str          # operands and attributes, as printed
  root: bool = False


@dataclasses.dataclass
class Kernel:
  """One kernel launch site (`launches` times per step)."""
  name: str          # as a profiler trace names it: '.' -> '_'
  op: str
  family: str
  shape: str         # result shape
  bytes_in: int
  bytes_out: int
  flops: float       # matrix-product FLOPs (2 per multiply-add)
  launches: int
  group: str         # launches with the same compiled kernel share it
  where: str         # model module and pass, e.g. 'attn/qkv bwd'
  elem_ops: float = 0.0   # element-wise arithmetic: one per element of each computing op
  pallas_gemm: bool = False   # a Pallas matrix-product kernel (its speed is unmeasured)
  triton: bool = False        # an XLA fusion emitted as a Triton kernel ('__triton' kind)

  @property
  def bytes(self) -> int:
    return self.bytes_in + self.bytes_out


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """HLO text -> ({computation name: instructions}, entry computation name)."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = '', None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = comps.setdefault(m.group(2), [])
      if m.group(1):
        entry = m.group(2)
      continue
    if line.startswith('}'):
      current = None
    elif current is not None:
      mi = _INSTRUCTION.match(line)
      if mi:
        root, name, shape, op, rest = mi.groups()
        current.append(Instruction(name, shape, op, rest, bool(root)))
  if not entry:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _operands(rest: str) -> list[str]:
  depth, end = 0, len(rest)
  for i, ch in enumerate(rest):        # the operand list ends at the first unmatched ')'
    if ch in '({':
      depth += 1
    elif ch in ')}':
      if depth == 0:
        end = i
        break
      depth -= 1
  return re.findall(r'%([\w.\-]+)', rest[:end])


def _called(rest: str) -> list[str]:
  """The computations an instruction calls (fusion bodies, loop bodies, branches)."""
  names = re.findall(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)', rest)
  for branches in re.findall(r'branch_computations=\{([^}]*)\}', rest):
    names += re.findall(r'%([\w.\-]+)', branches)
  return names


def _contracted_size(lhs_shape: str, dims: Optional[re.Match]) -> Optional[int]:
  """The product of the lhs dimensions `dims` captures (their indices, in any separators,
  in the instruction's text); None when the shape or the dimensions are not there."""
  lhs = shape_dims(lhs_shape)
  if not lhs or not dims:
    return None
  return math.prod(lhs[0][1][int(d)] for d in re.findall(r'\d+', dims.group(1)))


def _one_dot_flops(inst: Instruction, shapes: Mapping[str, str]) -> float:
  ops = _operands(inst.rest)
  k = _contracted_size(shapes.get(ops[0], '') if ops else '',
                       re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', inst.rest))
  return 2.0 * shape_elements(inst.shape) * (1 if k is None else k)


def _library_gemm_flops(inst: Instruction, operand_shapes: list[str]) -> float:
  """FLOPs of a matrix product XLA hands to a library (a cuBLAS / cuBLASLt custom call):
  2 x output elements x the contracted size, read from its backend config's
  `lhs_contracting_dimensions` and the shape of its first operand. 0 for other calls."""
  if 'custom_call_target="__cublas' not in inst.rest or not operand_shapes:
    return 0.0
  k = _contracted_size(operand_shapes[0],
                       re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.rest))
  return 0.0 if k is None else 2.0 * shape_elements(inst.shape) * k


def _pallas_gemm_flops(inst: Instruction, operand_shapes: list[str], family: str) -> float:
  """FLOPs of a Pallas matrix-product kernel (a Triton custom call a profile files as a GEMM
  by its name, e.g. fused_mlp's `mlp_matmul_act`): 2 x M x K x N of its first two operands,
  (M, K) and (K, N). 0 for other calls or other operands."""
  if family != 'gemm' or 'xla.gpu.triton' not in inst.rest or len(operand_shapes) < 2:
    return 0.0
  a, b = (shape_dims(s) for s in operand_shapes[:2])
  if not a or not b or len(a[0][1]) != 2 or len(b[0][1]) != 2 or a[0][1][1] != b[0][1][0]:
    return 0.0
  (m, k), (_, n) = a[0][1], b[0][1]
  return 2.0 * m * k * n


def _result_bytes(inst: Instruction) -> int:
  """Bytes an instruction writes: its result, less a library call's scratch workspace (the
  `s8[N]` second element of a cuBLAS call's result, which it may use in part or not at all)."""
  arrays = shape_dims(inst.shape)
  if (inst.op == 'custom-call' and 'custom_call_target="__cublas' in inst.rest
      and len(arrays) == 2 and arrays[1][0] == 's8'):
    arrays = arrays[:1]
  return _arrays_bytes(arrays)


def _sliced_library_call(comps: Mapping[str, list[Instruction]], inst: Instruction,
                         called: list[str], launches: int) -> Optional[Kernel]:
  """A library matrix product inside XLA's dynamic-slice fusion, as one GEMM kernel; None
  for any other instruction.

  With `xla_gpu_enable_dynamic_slice_fusion`, a cuBLAS call whose operands are dynamic
  slices of a scan's stacks (a layer's weights) or whose result is written into one becomes
  a custom fusion around the call: the call reads and writes the slices in place (only
  address arithmetic, no copy kernel). It is one launch of the call: its FLOPs, the bytes of
  the slices it reads (what its operands are inside the fusion) and of the product it
  writes."""
  if (inst.op != 'fusion' or '"dynamic_slice_fusion"' not in inst.rest or not called
      or not comps.get(called[0])):
    return None
  body = comps[called[0]]
  call = next((x for x in body if x.op == 'custom-call'
               and 'custom_call_target="__cublas' in x.rest), None)
  if call is None:
    return None
  shapes = {x.name: x.shape for x in body}
  operand_shapes = [shapes.get(o, '') for o in _operands(call.rest)]
  op_name = _OP_NAME.search(call.rest)
  names = [op_name.group(1)] if op_name else []
  kname = inst.name.replace('.', '_')
  return Kernel(
      name=kname, op='custom-call', family=family_of(call, kname, ' '.join(names)),
      shape=call.shape, bytes_in=sum(shape_bytes(x) for x in operand_shapes),
      bytes_out=_result_bytes(call), flops=_library_gemm_flops(call, operand_shapes),
      launches=launches, group=_group(comps, inst, called, kname), where=_where(names))


def _group(comps: Mapping[str, list[Instruction]], inst: Instruction, called: list[str],
           kname: str) -> str:
  """A kernel's group: launch sites of one compiled kernel (the same operation, shape and
  called computations up to names) share it; a site without computations is its own."""
  key = (inst.op + '\n' + inst.shape + '\n' + '\n'.join(_body_key(comps, c) for c in called)
         if called else kname)
  return hashlib.sha1(key.encode()).hexdigest()[:12]


# Operations whose result does not map element for element onto each operand: what a
# part of their result needs of an operand is not that part (they read all of it).
_NOT_ONE_TO_ONE = frozenset({
    'reduce', 'reduce-window', 'dot', 'convolution', 'broadcast', 'concatenate', 'pad',
    'gather', 'scatter', 'dynamic-update-slice', 'custom-call', 'fusion', 'sort',
    'select-and-scatter', 'iota', 'rng', 'while', 'call', 'conditional', 'tuple',
    'get-tuple-element'})


def _demand(insts: list[Instruction]) -> dict[str, float]:
  """The fraction of each instruction's elements that a fused computation's outputs need.

  A GPU fusion computes each output element from the input elements it needs, so an
  operation whose result is only sliced computes (and its parameters are read) only for
  that part: the bias add of a wide hidden whose adapter columns a gradient slices out
  reads those columns, not the whole hidden. Roots need all of themselves; a slice or
  dynamic slice needs its share of its operand; an element-for-element operation
  (element-wise, convert, bitcast, reshape, transpose) passes on what its users need;
  anything else needs all of its operands. Several slices of one operand add up (they may
  overlap: an upper bound), capped at 1."""
  root = next((i for i in insts if i.root), insts[-1] if insts else None)
  need: dict[str, float] = {}
  if root is None:
    return need
  whole = set(_operands(root.rest)) if root.op == 'tuple' else {root.name}
  users: dict[str, list[Instruction]] = collections.defaultdict(list)
  for i in insts:
    for o in set(_operands(i.rest)):
      users[o].append(i)
  for i in reversed(insts):        # HLO lists an operation after its operands
    if i.name in whole:
      need[i.name] = 1.0
      continue
    elements = shape_elements(i.shape)
    passed, sliced = 0.0, 0.0
    for u in users.get(i.name, []):
      first = _operands(u.rest)[0] == i.name
      if u.op in ('slice', 'dynamic-slice') and first and elements:
        sliced += need.get(u.name, 1.0) * shape_elements(u.shape) / elements
      elif u.op not in _NOT_ONE_TO_ONE and shape_elements(u.shape) == elements:
        passed = max(passed, need.get(u.name, 1.0))
      else:
        passed = 1.0
    need[i.name] = min(1.0, max(passed, sliced)) if users.get(i.name) else 1.0
  return need


def _fusion_bytes(comps: Mapping[str, list[Instruction]], comp: str,
                  operand_shapes: list[str], out_shape: str,
                  need: Mapping[str, float]) -> tuple[int, int]:
  """(bytes read, bytes written) of a fusion: an operand costs the part of it the
  fusion's outputs need (`_demand`: all of it, or only what slices and dynamic slices take
  out of it, through element-wise operations); the buffer of a dynamic-update-slice root is
  updated in place (the scan's stacked residuals), so only the update is written and the
  buffer is not read."""
  insts = comps.get(comp)
  if not insts:
    return sum(shape_bytes(x) for x in operand_shapes), shape_bytes(out_shape)
  by_name = {i.name: i for i in insts}
  uses: dict[str, list[Instruction]] = collections.defaultdict(list)
  for i in insts:
    for o in _operands(i.rest):
      uses[o].append(i)

  def final_uses(name: str) -> list[tuple[Instruction, str]]:
    out = []
    for u in uses.get(name, []):     # see through bitcasts (free)
      out += final_uses(u.name) if u.op == 'bitcast' else [(u, name)]
    return out

  root = next((i for i in insts if i.root), insts[-1])
  roots = [by_name[o] for o in _operands(root.rest) if o in by_name] if root.op == 'tuple' \
      else [root]
  read = 0
  for i in insts:
    if i.op != 'parameter':
      continue
    k = int(re.match(r'\s*(\d+)', i.rest).group(1))
    full = shape_bytes(operand_shapes[k]) if k < len(operand_shapes) else shape_bytes(i.shape)
    fu = final_uses(i.name)
    if fu and all(u.op == 'dynamic-update-slice' and src == _operands(u.rest)[0]
                  and u.name in {r.name for r in roots} for u, src in fu):
      continue                                      # updated in place: not read
    read += round(full * need.get(i.name, 1.0))
  written = 0
  for r in roots:
    if r.op == 'dynamic-update-slice':
      ops = _operands(r.rest)
      written += shape_bytes(by_name[ops[1]].shape) if len(ops) > 1 and ops[1] in by_name \
          else shape_bytes(r.shape)
    else:
      written += shape_bytes(r.shape)
  return read, written


# Operations that only move, view or produce data: no arithmetic per element.
_NO_ARITHMETIC = _FREE | frozenset({
    'broadcast', 'reshape', 'slice', 'dynamic-slice', 'dynamic-update-slice', 'transpose',
    'copy', 'concatenate', 'pad', 'iota', 'reverse', 'gather', 'scatter', 'dot', 'fusion',
    'custom-call', 'convolution'})


def _elem_ops(comps: Mapping[str, list[Instruction]], comp: str,
              need: Mapping[str, float]) -> float:
  """Element-wise arithmetic of a fused computation: for each computing operation the
  elements it produces (a reduction: the elements it reads), or the part of them the
  fusion's outputs need (`_demand`). Matrix products are counted as FLOPs instead. What HLO
  expands into steps (jax's erfc) counts each step; an op the GPU emitter expands itself (an
  HLO erf or exp) counts one: a lower bound."""
  insts = comps.get(comp) or []
  shapes = {i.name: i.shape for i in insts}
  ops = 0.0
  for i in insts:
    if i.op in _NO_ARITHMETIC:
      continue
    shape = shapes.get(_operands(i.rest)[0], i.shape) if i.op == 'reduce' else i.shape
    ops += shape_elements(shape) * need.get(i.name, 1.0)
  return ops


def _dot_flops(comps: Mapping[str, list[Instruction]], comp: str, seen: set) -> float:
  """FLOPs of the dots in `comp` and the computations it calls."""
  if comp in seen or comp not in comps:
    return 0.0
  seen.add(comp)
  shapes = {i.name: i.shape for i in comps[comp]}
  flops = 0.0
  for i in comps[comp]:
    if i.op == 'dot':
      flops += _one_dot_flops(i, shapes)
    for c in _called(i.rest):
      flops += _dot_flops(comps, c, seen)
  return flops


def _attention_flops(inst: Instruction, operand_shapes: list[str], op_name: str) -> float:
  """Matrix FLOPs of a fused attention call on (B, S, H, D) q/k/v: 2 products forward,
  5 in a one-kernel backward (the scores are recomputed), 3 or 4 in split backward kernels."""
  dims = next((d for s in operand_shapes for _, d in shape_dims(s) if len(d) == 4), None)
  if dims is None:
    return 0.0
  b, s, h, d = dims
  one = 2.0 * b * h * s * s * d
  name = (inst.name + ' ' + op_name).lower()
  if 'bwd' in name or 'backward' in name or 'transpose(' in name:
    if 'dq' in name:
      return 3 * one
    if 'dkv' in name or 'dk' in name:
      return 4 * one
    return 5 * one
  return 2 * one


def family_of(inst: Instruction, kernel_name: str, op_name: str) -> str:
  target = re.search(r'custom_call_target="([^"]+)"', inst.rest)
  if inst.op == 'custom-call' and target:
    t = target.group(1)
    if 'fmha' in t or ('triton' in t and re.search(r'mha|attention', op_name, re.I)):
      return 'attention'
    if re.search(r'gemm|cublas|matmul|conv', t, re.I):
      return 'gemm'
    pallas = re.search(r'([\w\-]+)/pallas_call', op_name)
    if 'triton' in t and pallas:
      # A Pallas kernel: by its name (`pallas_call(name=...)`), as a profile names it.
      return profile_kernels.family(pallas.group(1))
    return profile_kernels.family(t)
  if inst.op in ('copy', 'transpose', 'copy-start', 'copy-done'):
    return 'transpose/copy'
  if inst.op in _COLLECTIVES:
    return 'collective'
  return profile_kernels.family(kernel_name)


_WRAPPERS = re.compile(r'/(?:while/body|while/cond|eval_jaxpr|checkpoint|remat|'
                       r'rematted_computation|closed_call)(?=/)')
_MODULE = re.compile(r'(?:(?:resblocks|layers|blocks)(?:_\d+)?/|backbone/)'
                     r'(?!(?:resblocks|layers|blocks)(?:_\d+)?/)(\w+)(?:/(\w+))?')


def _where(op_names: Iterable[str]) -> str:
  """The commonest model module among a kernel's op names, and fwd/bwd."""
  tags, backward = [], False
  for name in op_names:
    backward = backward or 'transpose(jvp' in name
    name = _WRAPPERS.sub('', name)     # scan and remat wrappers between the module names
    m = _MODULE.search(name)
    if m:
      sub = m.group(2) if m.group(1) in ('attn', 'mlp') and m.group(2) else None
      tags.append(m.group(1) + ('/' + sub if sub else ''))
    elif name:
      parts = [p for p in name.split('/') if p and not p.startswith('jit(')]
      tags.append(parts[0].split('(')[-1].rstrip(')') if parts else '?')
  tag = collections.Counter(tags).most_common(1)[0][0] if tags else '?'
  return f"{tag} {'bwd' if backward else 'fwd'}"


def _body_key(comps: Mapping[str, list[Instruction]], comp: str) -> str:
  """A computation's text with names and metadata removed: equal keys, one compiled kernel."""
  local = {i.name: f'v{n}' for n, i in enumerate(comps.get(comp, []))}
  lines = []
  for i in comps.get(comp, []):
    rest = re.sub(r'metadata=\{[^}]*\}', '', i.rest)
    rest = re.sub(r'%([\w.\-]+)', lambda m: local.get(m.group(1), 'X'), rest)
    lines.append(f'{i.shape} {i.op}({rest}')
  return '\n'.join(lines)


def kernels(text: str) -> list[Kernel]:
  """Every kernel launch site of the program in `text` (optimised HLO)."""
  comps, entry = parse(text)
  op_names = {}
  for insts in comps.values():
    for i in insts:
      m = _OP_NAME.search(i.rest)
      if m:
        op_names[i.name] = m.group(1)
  out: list[Kernel] = []

  def walk(comp: str, launches: int) -> None:
    shapes = {i.name: i.shape for i in comps[comp]}
    for i in comps[comp]:
      if i.op in _FREE or i.op.endswith('-done'):    # a -done waits for its -start's work
        continue
      if i.op == 'custom-call' and 'custom_call_target="AllocateBuffer"' in i.rest:
        continue          # uninitialised memory (a zero fill XLA removed): no kernel
      if i.op == 'while':
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.rest)
        body = re.search(r'body=%([\w.\-]+)', i.rest).group(1)
        walk(body, launches * (int(trip.group(1)) if trip else 1))
        continue
      if i.op in ('call', 'conditional', 'async-start'):
        for c in _called(i.rest):
          walk(c, launches)
        continue
      ops = _operands(i.rest)
      called = _called(i.rest)
      if i.op == 'fusion-start' and called and comps.get(called[0]):   # an async fusion
        body = comps[called[0]]
        i = Instruction(i.name, next((x for x in body if x.root), body[-1]).shape, 'fusion',
                        i.rest, i.root)
      library = _sliced_library_call(comps, i, called, launches)
      if library is not None:
        out.append(library)
        continue
      inner = [op_names[x.name] for c in called for x in comps.get(c, []) if x.name in op_names]
      names = inner + ([op_names[i.name]] if i.name in op_names else [])
      kname = i.name.replace('.', '_')
      fam = family_of(i, kname, ' '.join(names))
      operand_shapes = [shapes.get(o, '') for o in ops]
      pallas = 0.0
      if fam == 'attention' and i.op == 'custom-call':
        flops = _attention_flops(i, operand_shapes, op_names.get(i.name, ''))
      else:
        flops = sum(_dot_flops(comps, c, set()) for c in called)
        if i.op == 'dot':
          flops += _one_dot_flops(i, shapes)
        elif i.op == 'custom-call':
          pallas = _pallas_gemm_flops(i, operand_shapes, fam)
          flops += _library_gemm_flops(i, operand_shapes) + pallas
      elem_ops = 0.0
      if i.op == 'fusion' and called:
        need = _demand(comps.get(called[0]) or [])    # what bytes and arithmetic count
        bytes_in, bytes_out = _fusion_bytes(comps, called[0], operand_shapes, i.shape, need)
        elem_ops = _elem_ops(comps, called[0], need)
      elif i.op == 'dynamic-update-slice':
        bytes_in = bytes_out = shape_bytes(operand_shapes[1]) if len(ops) > 1 else 0
      elif i.op in ('slice', 'dynamic-slice'):
        bytes_in = bytes_out = shape_bytes(i.shape)
      else:
        bytes_in = sum(shape_bytes(s) for s in operand_shapes)
        bytes_out = _result_bytes(i)
      out.append(Kernel(
          name=kname, op=i.op, family=fam, shape=i.shape, bytes_in=bytes_in, bytes_out=bytes_out,
          flops=flops, launches=launches, group=_group(comps, i, called, kname),
          where=_where(names), elem_ops=elem_ops, pallas_gemm=pallas > 0,
          triton=i.op == 'fusion' and '"kind":"__triton"' in i.rest))

  walk(entry, 1)
  return out


# Per-family rates on one H200, bf16 (bytes/s of memory traffic; FLOP/s of matrix work;
# transposes, the measured ones, apart from plain copies and in-place slice updates),
# calibrated on the measured kernel profile of this project's B/16 train step
# (BENCHMARKS.md, "GPU compile without a GPU"; element-wise and reductions refitted once a
# fusion's bytes counted only what its slices need, `_demand`). Refitted on 2026-12-04 on
# the two H200 profiles of that day (BENCHMARKS.md, "GPU"): element-wise loop fusions 3.3
# TB/s and XLA's Triton fusions (the LayerNorms and what XLA fuses with them,
# `triton_bytes_s`) 2.1 TB/s, which put the XLA-attention step within 1.5% and its
# element-wise family within 1.6%; cuDNN's flash attention at head dim 64 (the padded spatial
# attention, forward and backward) 170 TFLOP/s. Not modelled: cuDNN on sequences far
# shorter than its 64-row tiles (the 8-frame temporal attention: 92 ms measured) and
# reductions over a middle axis of size 8 (the element-wise temporal attention: 0.55 TB/s).
# `ops_s`: element-wise arithmetic (`Kernel.elem_ops`), fitted on the one kernel of that
# profile that is bound by it rather than by memory: the adapters' exact GELU as XLA expands
# erfc (68 operations per element, 19.6-20.8 T/s measured in train and eval).
RATES = {
    'gemm': {'bytes_s': 2.0e12, 'flops_s': 770e12},
    'attention': {'bytes_s': 3.0e12, 'flops_s': 170e12},
    'transpose/copy': {'bytes_s': 4.2e12, 'transpose_bytes_s': 1.3e12},   # copies stream
    'elementwise': {'bytes_s': 3.3e12, 'triton_bytes_s': 2.1e12, 'ops_s': 20e12},
    'reduction': {'bytes_s': 3.6e12, 'ops_s': 20e12},
    'collective': {'bytes_s': 0.4e12},   # NVLink between 8 GPUs (NCCL bus rate), not measured
    'other': {'bytes_s': 3.0e12, 'flops_s': 350e12},
}
LAUNCH_S = 2e-6   # the shortest kernel


def predict_s(k: Kernel, rates: Mapping[str, Mapping[str, float]] = RATES) -> float:
  """Roofline estimate of one launch: max(bytes / bandwidth, FLOPs / FLOP rate, element-wise
  operations / their rate, a floor)."""
  r = rates.get(k.family, rates['other'])
  bandwidth = r.get('transpose_bytes_s', r['bytes_s']) if 'transpose' in k.name else r['bytes_s']
  if k.triton:
    bandwidth = r.get('triton_bytes_s', bandwidth)
  t = k.bytes / bandwidth
  if k.flops and 'flops_s' in r:
    t = max(t, k.flops / r['flops_s'])
  if k.elem_ops and 'ops_s' in r:
    t = max(t, k.elem_ops / r['ops_s'])
  return max(t, LAUNCH_S)


def summarize(ks: list[Kernel], rates: Mapping[str, Mapping[str, float]] = RATES,
              top: int = 25, pallas_speed: float = 1.0) -> dict:
  """Per-family launches, GB, GFLOP and predicted ms per step; the top kernel groups.
  `pallas_speed`: the Pallas matrix-product kernels' speed as a fraction of XLA's GEMMs (their
  predicted times are divided by it; 1 = XLA's rates, which no device has measured yet)."""
  if not 0 < pallas_speed <= 1:
    raise ValueError(f'pallas_speed must be in (0, 1], got {pallas_speed}')
  step_ms = [predict_s(k, rates) * k.launches * 1e3 / (pallas_speed if k.pallas_gemm else 1.0)
             for k in ks]                                            # each kernel, per step
  fams: dict[str, dict] = {}
  groups: dict[str, dict] = {}
  by_where: dict[str, float] = collections.defaultdict(float)
  for k, ms in zip(ks, step_ms):
    f = fams.setdefault(k.family, dict(launches=0, gb=0.0, gflop=0.0, predicted_ms=0.0))
    f['launches'] += k.launches
    f['gb'] += k.bytes * k.launches / 1e9
    f['gflop'] += k.flops * k.launches / 1e9
    f['predicted_ms'] += ms
    g = groups.setdefault(k.group, dict(name=k.name, family=k.family, where=k.where,
                                        shape=k.shape[:160], launches=0, gb=0.0,
                                        predicted_ms=0.0))
    g['launches'] += k.launches
    g['gb'] += k.bytes * k.launches / 1e9
    g['predicted_ms'] += ms
    by_where[f'{k.family}: {k.where}'] += ms
  total = sum(f['predicted_ms'] for f in fams.values())
  for f in fams.values():
    f['share'] = f['predicted_ms'] / total if total else 0.0
    for key in ('gb', 'gflop', 'predicted_ms'):
      f[key] = round(f[key], 3)
  ranked = sorted(groups.values(), key=lambda g: -g['predicted_ms'])
  for g in ranked:
    g['gb'], g['predicted_ms'] = round(g['gb'], 3), round(g['predicted_ms'], 3)
  return dict(
      predicted_ms=round(total, 3), launches=sum(k.launches for k in ks),
      families=dict(sorted(fams.items(), key=lambda kv: -kv[1]['predicted_ms'])),
      top_kernels=ranked[:top],
      top_places={w: round(ms, 3) for w, ms in
                  sorted(by_where.items(), key=lambda kv: -kv[1])[:top]})


def match_profile(ks: list[Kernel], measured_ms: Mapping[str, float],
                  rates: Mapping[str, Mapping[str, float]] = RATES) -> list[dict]:
  """Measured kernel times (ms per step by kernel name: `kernels.json` of a
  `step_benchmark --profile` run) beside the prediction for the launches that share
  that compiled kernel. Kernels named by their library (cuBLAS `nvjet_*`, cuDNN)
  have no HLO name and are left out."""
  by_group: dict[str, list[Kernel]] = collections.defaultdict(list)
  for k in ks:
    by_group[k.group].append(k)
  name_group = {k.name: k.group for k in ks}
  rows = []
  for name, ms in measured_ms.items():
    if name not in name_group:
      continue
    members = by_group[name_group[name]]
    rows.append(dict(
        name=name, family=members[0].family, where=members[0].where,
        launches=sum(m.launches for m in members),
        gb=round(sum(m.bytes * m.launches for m in members) / 1e9, 3),
        gflop=round(sum(m.flops * m.launches for m in members) / 1e9, 3),
        measured_ms=round(ms, 3),
        predicted_ms=round(sum(predict_s(m, rates) * m.launches for m in members) * 1e3, 3)))
  return rows


def main(argv: list[str] | None = None) -> int:
  """python -m benchmarks.hlo_kernels PROGRAM.hlo [--top N] [--pallas_speed F]: the kernel
  families and the top N kernels of an optimised program (as `gpu_aot --hlo_dir` writes it),
  with predicted times."""
  import argparse
  import sys
  p = argparse.ArgumentParser(prog='python -m benchmarks.hlo_kernels',
                              description=' '.join(main.__doc__.split()))
  p.add_argument('program', help='optimised HLO text (gpu_aot --hlo_dir writes VARIANT_MODE.hlo)')
  p.add_argument('--top', type=int, default=25, help='how many kernels to list (default 25)')
  p.add_argument('--pallas_speed', type=float, default=1.0,
                 help="the Pallas matrix-product kernels' speed as a fraction of XLA's GEMMs, "
                      "in (0, 1] (default 1: XLA's rates)")
  args = p.parse_args(argv)
  if not 0 < args.pallas_speed <= 1:
    p.error(f'--pallas_speed must be in (0, 1], got {args.pallas_speed}')
  try:
    with open(args.program) as f:
      s = summarize(kernels(f.read()), top=args.top, pallas_speed=args.pallas_speed)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    print(f'hlo_kernels: {args.program}: {str(e).splitlines()[0] if str(e) else type(e).__name__}',
          file=sys.stderr)
    return 2
  print(json.dumps(s, indent=1))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
