#!/usr/bin/env bash
# A multi-node GPU job without SLURM: run this on every node, each with its own
# --process-id (0 on the node whose HOST:PORT is the coordinator).
#
#   node0$ launch/multinode.sh --coordinator node0:12355 --num-processes 2 --process-id 0 \
#            configs/k400.py:b16_f8 /shared/runs/k400_b16
#   node1$ launch/multinode.sh --coordinator node0:12355 --num-processes 2 --process-id 1 \
#            configs/k400.py:b16_f8 /shared/runs/k400_b16
#
# One process per node uses all of its GPUs; for one process per GPU start G
# processes per node with --local-device-ids i and ids node*G+i. The workdir
# must be gs:// or on a shared file system. --dry-run prints the exact script.
# Interpreter: $PYTHON, else this checkout's .venv, else python3.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py=$here/../.venv/bin/python; else py=python3; fi
fi
exec "$py" "$here/launch.py" multinode "$@"
