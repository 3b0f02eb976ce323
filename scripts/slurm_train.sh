#!/bin/bash
# Train deepcad-jax on a SLURM cluster: one process per node, all GPUs of each node.
#
#   sbatch --nodes=2 scripts/slurm_train.sh /data/movies runs/mouse1 --epochs 20
#
# srun starts one task per node; each runs `deepcad-jax train --distributed`, which lets
# JAX read SLURM's environment (coordinator, process count and id), forms one mesh over
# every GPU of every node, and splits each global batch between the nodes. Checkpoints
# are written once, to the shared --workdir; rerun the same command to resume (with any
# number of nodes).
#SBATCH --job-name=deepcad-jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=deepcad-jax-%j.log
set -euo pipefail
DATA=${1:?usage: sbatch scripts/slurm_train.sh DATA WORKDIR [train flags]}
WORKDIR=${2:?usage: sbatch scripts/slurm_train.sh DATA WORKDIR [train flags]}
shift 2
# One batch element per GPU by default; pass --batch-size to change it.
srun deepcad-jax train --distributed --data "$DATA" --workdir "$WORKDIR" "$@"
