"""Multi-host start-up with JAX's own runtime (`jax.distributed`).

`maybe_initialize()` is called first thing by every entry point. It calls
`jax.distributed.initialize` when the environment describes a multi-process
job and does nothing on a single process:

  * explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES,
    JAX_PROCESS_ID [, JAX_LOCAL_DEVICE_IDS] (plain multi-node recipe);
  * SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1) and Cloud TPU pods: JAX's
    auto-detection (`jax.distributed.initialize()` with no arguments).
    JAX gives each SLURM task only the GPU numbered SLURM_LOCALID; with one
    process per node, JAX_LOCAL_DEVICE_IDS=0,...,G-1 (set by
    launch/slurm.sbatch) hands it all of the node's GPUs;
  * AIM_JAX_DISTRIBUTED=auto (launch/tpu_pod.sh): auto-detection anywhere,
    for TPU VMs made with `gcloud compute tpus tpu-vm create`, whose worker
    list JAX reads from the metadata server (TPU_WORKER_HOSTNAMES is set on
    GKE only).
"""

from __future__ import annotations

import os

_initialized = False


def maybe_initialize() -> bool:
  """Initialise jax.distributed if the environment asks for it; True if it did."""
  global _initialized
  if _initialized:
    return True
  import jax
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS') and int(env.get('JAX_NUM_PROCESSES', '1')) > 1:
    local = env.get('JAX_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(env['JAX_NUM_PROCESSES']),
        process_id=int(env['JAX_PROCESS_ID']),
        local_device_ids=[int(i) for i in local.split(',')] if local else None)
    _initialized = True
  elif env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1')) > 1:
    local = env.get('JAX_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        local_device_ids=[int(i) for i in local.split(',')] if local else None)
    _initialized = True
  elif env.get('AIM_JAX_DISTRIBUTED') == 'auto':
    jax.distributed.initialize()
    _initialized = True
  elif env.get('TPU_WORKER_HOSTNAMES') and ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()
    _initialized = True
  return _initialized
