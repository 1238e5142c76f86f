#!/usr/bin/env bash
# One node, N GPUs, launched by torchrun (Lightning picks up its environment):
#   scripts/torchrun.sh 8 data=webdataset model.pretrained=/models/sd15 "data.train_shards='/data/{00000..00999}.tar'"
# The overrides come after the script's own and win: on a CPU (as the tests run it),
#   scripts/torchrun.sh 2 trainer.accelerator=cpu trainer.precision=32-true ...
# and Lightning's DDP then talks over gloo instead of NCCL.
set -euo pipefail
n="${1:?usage: scripts/torchrun.sh NUM_GPUS [overrides...]}"; shift
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# Each rank resolves the run folder's ${now:...} itself and might land a second later: one stamp,
# taken here, gives all ranks the same folder (a hydra.run.dir in the overrides still wins).
stamp="$(date +%Y-%m-%d_%H-%M-%S)"
exec torchrun --standalone --nproc_per_node "$n" -m sdtrain.train trainer=gpu \
  trainer.devices="$n" trainer.strategy=ddp "hydra.run.dir=\${paths.log_dir}/\${task_name}/runs/$stamp" "$@"
