#!/usr/bin/env bash
# The wheels a GPU machine without internet access lacks, fetched in one step where there is access:
#
#   scripts/gpu_wheels.sh wheels 3.12     # folder, and the GPU machine's Python version (python3 --version there)
#   # copy the tree (wheels/ included) over, then on the GPU machine:
#   scripts/gpu_check.sh --wheels wheels --budget-minutes 12
#
# For an image that already holds torch, numpy, pyarrow, sentencepiece, sacrebleu, tensorboard, matplotlib, tqdm,
# xxhash and pytest: what is left is `datasets` and Hydra, with their own small dependencies, about 1.2 MB in all.
# `mplfonts` (the CJK font of the Chinese heatmaps) is an 85 MB wheel and stays behind: without it the GPU suite
# trains without heatmaps. The versions are the ones the test suite runs with.
set -euo pipefail
DIR="${1:-wheels}" VERSION="${2:-3.12}"
BINARY=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8 omegaconf==2.3.1)
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${BINARY[@]}"
# Hydra's parser runtime is published as source only; its wheel is pure Python, so building it here serves any platform.
python3 -m pip wheel --quiet --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
ls -1 "$DIR"
