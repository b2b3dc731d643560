"""Does cuDNN fused attention work here, forward and backward, at the shapes AIM would use?

  python -m benchmarks.attention_smoke --out cudnn_attention.json            # on a GPU
  python -m benchmarks.attention_smoke --implementation xla --out x.json     # the same checks, CPU
  python -m benchmarks.attention_smoke --implementation pallas --out p.json  # the Pallas kernel

AIM's spatial attention runs over 1 + (224/16)^2 = 197 tokens. Under `grad`, jax's cuDNN
path refuses odd sequence lengths (it passes a placeholder bias, and cuDNN's backward
with a bias wants even lengths), so the usable form is an even padded length with
`query_seq_lengths` / `key_value_seq_lengths` = 197, which masks the padding without a
bias tensor. The model pads its token stream to the kernel's multiple
(`vit.DEFAULT_PAD_MULTIPLE`: 197 -> 200 for cuDNN, 224 for the Pallas kernel; XLA needs
none, and is padded to even here, 197 -> 198, so that the masked case is still the one
checked). This script runs exactly that, forward and backward (grads of q, k, v), for
`--implementation` (cudnn by default), and compares the valid rows with
`implementation='xla'` on the unpadded length-197 inputs. It also records whether the
unpadded odd length works under `grad` (the failure is a result, not an error). Each
case's time per call is measured after compilation. `--implementation pallas` runs the
Pallas flash attention the same way, as the model runs it (`vit.attention`: the tokens
padded to its 32-token tiles, 197 -> 224, the padding in a segment of its own).
`auto_check` holds the result of the check `model.attention_impl='auto'` runs before
choosing the kernel (models/attention_choice.py) and `choice`, what 'auto' chooses on
this machine: when cuDNN fails its check, the Pallas kernel's check runs too
(`auto_check.pallas`).
One JSON object is written to --out; the exit status is 0 when the padded
case ran and matched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _timed(fn, *args, n=5):
  import jax
  out = jax.block_until_ready(fn(*args))      # compiles
  t0 = time.perf_counter()
  for _ in range(n):
    out = jax.block_until_ready(fn(*args))
  return out, (time.perf_counter() - t0) / n


def run(implementation: str, batch: int, tokens: int, heads: int, head_dim: int,
        dtype: str) -> dict:
  """Padded-length attention with sequence lengths, fwd + bwd, against XLA on the valid rows."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from aim_jax.models import attention_choice, vit
  dt = jnp.dtype(dtype)
  multiple = max(2, vit.DEFAULT_PAD_MULTIPLE[implementation])    # the model's padding
  padded = vit.round_up(tokens, multiple)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(r, (batch, tokens, heads, head_dim), jnp.float32).astype(dt)
                for r in keys)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0), (0, 0)))
  lengths = jnp.full((batch,), tokens, jnp.int32)

  def loss_fn(impl, seq_lengths):
    def loss(q, k, v, g):
      if impl == 'pallas':   # the model's call: the padding masked by segment
        o = vit.attention(q, k, v, impl=impl, valid_len=tokens if seq_lengths else None)
      else:
        kw = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths) if seq_lengths else {}
        o = jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw)
      n = min(o.shape[1], tokens)    # the cotangent on the valid rows only
      return jnp.sum(o[:, :n].astype(jnp.float32) * g[:, :n].astype(jnp.float32)), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  def compare(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max())

  out = dict(implementation=implementation, batch=batch, tokens=tokens, padded_tokens=padded,
             heads=heads, head_dim=head_dim, dtype=dtype, device=jax.devices()[0].device_kind,
             jax=jax.__version__)
  (_, o_ref), g_ref = loss_fn('xla', False)(q, k, v, g)
  try:
    ((_, o), grads), sec = _timed(loss_fn(implementation, True), pad(q), pad(k), pad(v), pad(g))
  except Exception as e:  # noqa: BLE001  the failure is the finding
    out['padded'] = dict(ok=False, error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
  else:
    diffs = dict(out=compare(o[:, :tokens], o_ref),
                 **{f'd{n}': compare(gr[:, :tokens], gr_ref) for n, gr, gr_ref in
                    zip('qkv', grads, g_ref)},
                 # the padded keys and values must get no gradient
                 dk_padding=float(np.abs(np.asarray(grads[1][:, tokens:], np.float32)).max(
                     initial=0.0)))
    tol = 2e-2 if dt == jnp.bfloat16 else 1e-4
    ok = all(d <= tol * max(1.0, float(np.abs(np.asarray(o_ref, np.float32)).max()))
             for d in diffs.values())
    out['padded'] = dict(ok=ok, max_abs_diff_vs_xla=diffs, tolerance=tol, fwd_bwd_s=sec)
  try:
    _, sec = _timed(loss_fn(implementation, False), q, k, v, g)
  except Exception as e:  # noqa: BLE001
    out['odd_length_grad'] = dict(ok=False,
                                  error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
  else:
    out['odd_length_grad'] = dict(ok=True, fwd_bwd_s=sec)
  # The check model.attention_impl='auto' runs before it chooses this kernel (the model's
  # two shapes, small, against XLA): what a training run on this machine would choose.
  ok, why = attention_choice._compare_with_xla(implementation)
  out['auto_check'] = dict(ok=ok, why=why, choice=implementation if ok else 'xla')
  if not ok and implementation == 'cudnn':      # 'auto' tries the Pallas kernel next
    p_ok, p_why = attention_choice._compare_with_xla('pallas')
    out['auto_check'].update(pallas=dict(ok=p_ok, why=p_why), choice='pallas' if p_ok else 'xla')
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--implementation', default='cudnn', choices=['cudnn', 'pallas', 'xla'])
  p.add_argument('--batch', type=int, default=64 * 8)      # B/16 spatial: clips x frames
  p.add_argument('--tokens', type=int, default=197)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  r = run(a.implementation, a.batch, a.tokens, a.heads, a.head_dim, a.dtype)
  print(json.dumps(r, indent=1), flush=True)
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(r, f, indent=1)
  return 0 if r['padded']['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
