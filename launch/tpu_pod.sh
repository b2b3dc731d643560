#!/usr/bin/env bash
# Cloud TPU VM slices (any size) with `gcloud compute tpus tpu-vm`.
#
# Train: create the slice or reuse it (re-create it if it was preempted), copy
# this tree to every worker, install it with jax[tpu], start the job on all
# workers at once (--worker=all) in the background, logging to
# ~/aim-jax-logs/train.log on each worker:
#   launch/tpu_pod.sh train --name aim-v4 --zone us-central2-b --accelerator v4-32 \
#       configs/k400.py:b16_f8 gs://BUCKET/aim/k400_b16_f8 \
#       --config.init_from=gs://BUCKET/ckpt/clip_b16
# Evaluate a workdir or converted checkpoint:
#   launch/tpu_pod.sh evaluate --name aim-v4 --zone us-central2-b --accelerator v4-32 \
#       configs/k400.py:b16_f8 gs://BUCKET/aim/k400_b16_f8
# Follow logs:  launch/tpu_pod.sh logs --name aim-v4 --zone us-central2-b [--worker 0|all]
# Stop:         launch/tpu_pod.sh stop --name aim-v4 --zone us-central2-b   (SIGTERM: checkpoints)
# Resume:       the same train command again (after preemption too)
# Delete:       launch/tpu_pod.sh delete --name aim-v4 --zone us-central2-b
#
# --dry-run prints the exact script. Runs with any python3 (no jax needed here).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py=$here/../.venv/bin/python; else py=python3; fi
fi
exec "$py" "$here/launch.py" tpu "$@"
