#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU; Lightning reads the SLURM environment.
#   sbatch --nodes=2 scripts/slurm.sh model.pretrained=/models/sd15 "data.train_shards='/data/{00000..09999}.tar'"
# Preemption and time limits: SLURM sends SIGUSR1 90 s ahead (--signal); Lightning's handler
# saves hpc_ckpt_<n>.ckpt in the run folder and requeues the job (`scontrol requeue`, allowed by
# --requeue), whose SIGTERM stops the run at the step reached with checkpoints/last.ckpt.
# The run folder is outputs/slurm/<job id> (a requeued job keeps its id; SDTRAIN_RUN_DIR sets
# another), and a start that finds checkpoints/last.ckpt there resumes from it (ckpt_path=last).
#SBATCH --job-name=sdtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@90
#SBATCH --requeue
set -euo pipefail
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # keep NVLink multicast off where it is unsupported
run="${SDTRAIN_RUN_DIR:-outputs/slurm/${SLURM_JOB_ID:?run under sbatch (SLURM_JOB_ID is unset)}}"
resume=()
if [[ -f "$run/checkpoints/last.ckpt" || -f "$run/checkpoints/last.ckpt/meta.pt" ]]; then  # a file, or trainer=fsdp's sharded folder
  resume=(ckpt_path=last)
  echo "slurm.sh: resuming $run from checkpoints/last.ckpt (restart ${SLURM_RESTART_COUNT:-?})"
fi
# exec: srun's tasks get the signals; --kill-on-bad-exit: a task that fails ends the others;
# the overrides given here ("$@") come last and win
exec srun --kill-on-bad-exit=1 sdtrain-train experiment=finetune_sd15 trainer.devices="$SLURM_NTASKS_PER_NODE" \
  trainer.num_nodes="$SLURM_NNODES" trainer.strategy=ddp hydra.run.dir="$run" "${resume[@]}" "$@"
