"""`python -m aim_jax.convert`: see aim_jax.convert.cli."""

from aim_jax.convert.cli import run

if __name__ == '__main__':
  run()
