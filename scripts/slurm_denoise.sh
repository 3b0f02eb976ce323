#!/bin/bash
# Denoise on a SLURM cluster: a folder's files are split between the nodes; a single
# movie's temporal slabs are split, and node 0 assembles the output.
#
#   sbatch --nodes=4 scripts/slurm_denoise.sh runs/mouse1 /data/movies /data/denoised
#SBATCH --job-name=deepcad-jax-denoise
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=deepcad-jax-denoise-%j.log
set -euo pipefail
MODEL=${1:?usage: sbatch scripts/slurm_denoise.sh MODEL INPUT OUTPUT [denoise flags]}
INPUT=${2:?}
OUTPUT=${3:?}
shift 3
srun deepcad-jax denoise --distributed --model "$MODEL" --input "$INPUT" --output "$OUTPUT" "$@"
