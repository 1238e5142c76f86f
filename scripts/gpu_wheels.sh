#!/usr/bin/env bash
# The wheels a GPU call needs beyond the machine's image (all git-ignored), from the project root:
#   .whlmem  the shared ../shared/device/wheels.sh set (diffusers, hydra, webdataset, wandb, ...)
#            plus pytest (the CUDA tests), torchao (model.fp8), prodigyopt and schedulefree;
#   .whlbnb  a lean set for the memory savers' runs (scripts/experiment_memory.py --savers all):
#            .whlmem without wandb and its dependencies (those runs log nothing), plus
#            bitsandbytes (8-bit AdamW, 43 MB), so it fits the device tool's 64 MiB carry.
# Carry one of them and start each device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whlmem/*.whl && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
EXTRA_WHEELS="pytest pluggy iniconfig pygments torchao==0.17.0 prodigyopt schedulefree" \
  ../shared/device/wheels.sh
rm -rf .whlmem .whlbnb && mv .whl .whlmem
mkdir .whlbnb
for w in .whlmem/*.whl; do
  case "$(basename "$w")" in
    wandb-*|opentelemetry*|googleapis*|pydantic*|annotated_types*|typing_inspection*|httpx2*|\
    httpcore2*|truststore*|sniffio*|distro*|lazy_importer*|cwevals*|platformdirs*|\
    importlib_metadata*) ;;
    *) cp "$w" .whlbnb/ ;;
  esac
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whlbnb "bitsandbytes>=0.50"
for d in .whlmem .whlbnb; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
du -sh .whlmem .whlbnb
