#!/usr/bin/env bash
# The pending one-GPU measurements, as named calls of at most ~9.5 minutes each, so a lent machine
# runs a checked command, not one typed in a hurry. Each step has its own timeout and writes its
# log and JSON under $OUT (a cut-off call still returns what it finished); rows go to
# docs/benchmarks.md by hand, with the card named.
#
#   scripts/gpu_calls.sh CALL        on the GPU machine, from the project root, after
#                                    scripts/gpu_wheels.sh here (carry .whlmem, or .whlbnb for
#                                    `savers`)
#   TINY=1 OUT=/tmp/o scripts/gpu_calls.sh CALL     the same steps at toy sizes on a CPU
#
# As a device-tool command (carry [".whlmem", ".clean"], .clean a git worktree of the commit to
# measure; the symlinks give the uninstalled checkout the package layout pyproject maps):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whlmem/*.whl >/dev/null 2>&1; export PYTHONPATH=$PWD/.clean:/tmp/site;
#   cd .clean && for d in datamodules callbacks conf; do ln -sfn ../$d sdtrain/$d; done;
#   bash scripts/gpu_calls.sh speed
#
# CALL (each sized for one 600 s device call, cold compiles included: a fresh machine has no cache):
#   speed     issue 29: the fusion check on the GPU; attention processors (heads padded to 64)
#             per kernel; the pipeline at 512 px x 64, then the same run again (the warm start:
#             its first step with the compile cache)
#   graphs    issue 29: the pipeline at 512 px x 64 without and with model.cuda_graphs=true
#   graphs_small  the same at 256 px x 8, where launching (CPU time) bounds the step: the step
#             time the graphs remove there is the per-step CPU time they remove
#   sdxl      issues 28/29: SDXL pipeline at 1024 px x 4 with cuDNN attention, with PyTorch's
#             choice, and with cuDNN + FP8 (model.fp8=tensorwise), against 15 images/s (the
#             compiled checkpointing fix, compile=repeated + channels-last, is in no call now:
#             `savers` checkpoints sdxl_finetune eagerly)
#   savers    issue 31: full fine-tunes with every memory saver (bitsandbytes: carry .whlbnb),
#             and the CUDA tests (offload's memory, CUDA graphs)
# On a machine of GPUS cards (default 4; TINY=1: 2 CPU processes over gloo):
#   ddp       issue 29 item 5: the compiled pipeline at 512 px x 64 a GPU, 1 GPU then GPUS (DDP)
#   fsdp      issue 29 item 5: the eager pipeline at 512 px x 32 a GPU, 1 GPU then GPUS (FSDP)
#   sdxl_multi  issue 28: SDXL at 1024 px x 4 a GPU with checkpointing, 1 GPU, GPUS DDP, GPUS FSDP
#   sdxl_curves issue 28: SDXL's 200-step loss, 1 GPU (two seeds: the noise band), GPUS DDP and
#             FSDP, at 256 px and one global batch (scripts/loss_curves.py)
set -uo pipefail
CALL=${1:?name a call: speed, graphs, graphs_small, sdxl, savers, ddp, fsdp, sdxl_multi or sdxl_curves}
OUT=${OUT:?set OUT (the device tool sets it)}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ind}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "${TINY:-0}" = 1 ]; then
  SIZE=(--family sdxl --tiny --cases 64x2 --images 8 --workers 1 --steps 3 --warmup 2)
  SDXL=("${SIZE[@]}") HALF=("${SIZE[@]}") COMPILE=None FUSION=(--tiny) EM=(--tiny) T=1 GPUS=2
  MULTI=(--extra trainer.accelerator=cpu) CURVES=(--family sdxl --tiny --px 64 --images 16
    --global-batch 4 --steps 6 --window 2 --extra trainer.accelerator=cpu)
else
  SIZE=(--cases 512x64 --images 128 --workers 6 --steps 20 --warmup 5)
  HALF=(--cases 512x32 --images 128 --workers 6 --steps 20 --warmup 5)
  SDXL=(--family sdxl --cases 1024x4 --images 64 --workers 4 --steps 20 --warmup 10)
  COMPILE=unet FUSION=() EM=() T=0 GPUS=${GPUS:-4} MULTI=()
  CURVES=(--family sdxl --px 256 --images 256 --global-batch 16 --steps 200 --window 20
    --extra model.gradient_checkpointing=true)
fi
BENCH=(scripts/benchmark.py --work /tmp/bench --logs "$OUT/logs")

step() {  # step NAME SECONDS COMMAND...: run with a timeout, output teed to $OUT/NAME.log
  local name=$1 secs=$2
  shift 2
  echo "== $name (at most ${secs}s)"
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log" |
    grep -E '^\{|^(variant|pipeline|raw_)|fused|window|band|Error|error:|passed|failed' | tail -12
}

case "$CALL" in
  speed)
    step fusion 60 $PY scripts/fusion_check.py "${FUSION[@]}" --json "$OUT/fusion.json"
    if [ "$T" = 0 ]; then
      step attention 80 $PY scripts/attention_bench.py --batch 64 --px 512 --steps 10 \
        --processors diffusers pad64 --kernels default cudnn --out "$OUT/attention.json"
    fi
    # the same shapes twice: the second run's warmup_s is the warm start (compile cache)
    step pipeline_cold 320 $PY "${BENCH[@]}" "${SIZE[@]}" --timeout 300 --out "$OUT/speed.json" \
      --variants "pipeline:$COMPILE"
    step pipeline_warm 130 $PY "${BENCH[@]}" "${SIZE[@]}" --timeout 120 --out "$OUT/speed.json" \
      --variants "pipeline:$COMPILE"
    ;;
  graphs | graphs_small)  # compiled even at toy sizes: graphs need model.compile (CPU: fall back)
    CASE=("${SIZE[@]}")
    [ "$CALL" = graphs_small ] && [ "$T" = 0 ] && CASE=(--cases 256x8 --images 64 --workers 4
      --steps 50 --warmup 10)
    C=${COMPILE/None/repeated}
    step "$CALL" 580 $PY "${BENCH[@]}" "${CASE[@]}" --timeout 280 --out "$OUT/$CALL.json" \
      --variants "pipeline:$C" "pipeline:$C|model.cuda_graphs=true"
    ;;
  sdxl)
    C=repeated
    [ "$T" = 1 ] && C=None
    # cuDNN's attention first (cold), PyTorch's choice second (the ResNet layers' graphs cached),
    # then FP8 on top of the faster attention (compiled checkpointing is not measured here)
    step sdxl 580 $PY "${BENCH[@]}" "${SDXL[@]}" --timeout 210 --out "$OUT/sdxl.json" --variants \
      "pipeline:$C|model.attention=cudnn" "pipeline:$C" "pipeline:$C|model.attention=cudnn|model.fp8=tensorwise"
    ;;
  savers)
    step savers 380 $PY scripts/experiment_memory.py "${EM[@]}" --experiments finetune_sd15 \
      sdxl_finetune --savers all --steps 3 --timeout 170 --work /tmp/em --json "$OUT/exp_mem.json"
    step cuda_tests 180 $PY -m pytest -q -p no:cacheprovider tests/training/test_offload.py \
      tests/models/test_cuda_graphs.py -k cuda
    ;;
  ddp)
    step ddp 580 $PY "${BENCH[@]}" "${SIZE[@]}" "${MULTI[@]}" --timeout 300 --out "$OUT/ddp.json" \
      --variants "pipeline:$COMPILE@1xddp" "pipeline:$COMPILE@${GPUS}xddp"
    ;;
  fsdp)
    step fsdp 580 $PY "${BENCH[@]}" "${HALF[@]}" "${MULTI[@]}" --timeout 280 --out "$OUT/fsdp.json" \
      --variants "pipeline:None@1xddp" "pipeline:None@${GPUS}xfsdp"
    ;;
  sdxl_multi)
    C=repeated
    [ "$T" = 1 ] && C=None
    K="model.gradient_checkpointing=true"
    step sdxl_multi 580 $PY "${BENCH[@]}" "${SDXL[@]}" "${MULTI[@]}" --timeout 200 \
      --out "$OUT/sdxl_multi.json" --variants "pipeline:$C@1xddp|$K" "pipeline:$C@${GPUS}xddp|$K" \
      "pipeline:$C@${GPUS}xfsdp|$K"
    ;;
  sdxl_curves)
    step sdxl_curves 580 $PY scripts/loss_curves.py --work /tmp/bench "${CURVES[@]}" \
      --runs 1xsingle:42 1xsingle:43 "${GPUS}xddp:42" "${GPUS}xfsdp:42" --out "$OUT/sdxl-curves"
    ;;
  *)
    echo "unknown call $CALL: speed, graphs, graphs_small, sdxl, savers, ddp, fsdp, sdxl_multi or sdxl_curves" >&2
    exit 2
    ;;
esac
