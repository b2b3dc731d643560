#!/usr/bin/env bash
# One machine: every local device in one process (GPUs, TPU or CPU), or N
# simulated processes on CPU that form a multi-host job on localhost.
#
#   launch/local.sh configs/tiny.py /tmp/aim_tiny
#   launch/local.sh configs/tiny.py /tmp/aim_tiny --processes 2 --cpu-devices 4
#   launch/local.sh --job evaluate configs/k400.py:b16_f8 /path/to/workdir_or_checkpoint
#   launch/local.sh configs/k400.py:b16_f8 gs://bucket/k400_b16 --config.init_from=/ckpt/clip_b16
#
# --dry-run prints the exact script; --config.FIELD=VALUE and anything after
# `--` go to python -m aim_jax.train. `launch/local.sh --help` lists the rest.
# Interpreter: $PYTHON, else this checkout's .venv, else python3.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py=$here/../.venv/bin/python; else py=python3; fi
fi
exec "$py" "$here/launch.py" local "$@"
