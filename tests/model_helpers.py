"""Helpers the model tests share: a jaxpr walker and the inputs of the fused MLP."""

import jax
import jax.numpy as jnp


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (custom_vjp, checkpoint, pjit,
  the branches of a cond such as `platform_dependent`'s)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        while not hasattr(sub, 'eqns') and hasattr(sub, 'jaxpr'):
          sub = sub.jaxpr                        # a ClosedJaxpr (or a wrapper of one)
        if hasattr(sub, 'eqns'):
          yield from equations(sub)


def mlp_adapter_inputs(d=32, f=128, a=8, tokens=10):
  """`(x, xn, weights, s)` for norm.mlp_with_adapter: the stream and the normed input
  (2, 3, tokens, d), the eight weights of an MLP of width f and an adapter of width a, and
  a drop-path draw per token times the joint scale 0.5."""
  k = jax.random.split(jax.random.key(0), 12)
  x = jax.random.normal(k[0], (2, 3, tokens, d))
  xn = jax.random.normal(k[1], (2, 3, tokens, d))
  shapes = [(d, f), (f,), (f, d), (d,), (d, a), (a,), (a, d), (d,)]
  ws = [0.2 * jax.random.normal(k[i + 2], sh) for i, sh in enumerate(shapes)]
  s = jnp.asarray([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], jnp.float32).reshape(1, 1, tokens, 1) * 0.5
  return x, xn, ws, s
