#!/usr/bin/env bash
# Submit launch/slurm.sbatch with the job's shape: N nodes x G GPUs, one JAX
# process per GPU (default) or per node.
#
#   launch/slurm_submit.sh --nodes 1 --gpus-per-node 8 \
#       configs/k400.py:b16_f8 /shared/runs/k400_b16 \
#       --config.init_from=/shared/ckpt/clip_b16 --time 24:00:00 --partition gpu
#
# Resume after a time limit or preemption: submit the same command again.
# --dry-run prints the exact sbatch line. Interpreter for the job: --python,
# default the one running this ($PYTHON, else this checkout's .venv, else python3).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py=$here/../.venv/bin/python; else py=python3; fi
fi
exec "$py" "$here/launch.py" slurm "$@"
