#!/usr/bin/env bash
# One node, N GPUs, launched by torchrun (Lightning picks up its environment):
#   scripts/torchrun.sh 8 model.pretrained=/models/sd15 "data.train_shards='/data/{00000..00999}.tar'"
set -euo pipefail
n="${1:?usage: scripts/torchrun.sh NUM_GPUS [overrides...]}"; shift
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
exec torchrun --standalone --nproc_per_node "$n" -m sdtrain.train trainer=gpu \
  trainer.devices="$n" trainer.strategy=ddp "$@"
