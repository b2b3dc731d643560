"""Checkpoint formats, one module per source library; see aim_jax.convert.registry."""
