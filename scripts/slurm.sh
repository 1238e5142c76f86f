#!/usr/bin/env bash
# --signal=USR1@90: SLURM warns 90 s before the time limit; the run saves at the step reached.
# Multi-node training under SLURM: one task per GPU; Lightning reads the SLURM environment.
#   sbatch --nodes=2 scripts/slurm.sh model.pretrained=/models/sd15 "data.train_shards='/data/{00000..09999}.tar'"
#SBATCH --job-name=sdtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=USR1@90
set -euo pipefail
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # keep NVLink multicast off where it is unsupported
srun sdtrain-train experiment=finetune_sd15 trainer.devices="$SLURM_NTASKS_PER_NODE" \
  trainer.num_nodes="$SLURM_NNODES" trainer.strategy=ddp "$@"
