#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a lent GPU machine, which has torch, transformers
# and pyarrow but no diffusers, and reaches no package registry (9.4 MB; the device tool carries
# at most 64 MiB). Run here, then carry the folder:
#   bash benchmarks/gpu_wheels.sh            # -> benchmarks/wheels/ (git-ignored)
#   on the GPU: pip install --no-index --no-deps benchmarks/wheels/*.whl && python -m benchmarks.gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
dest=benchmarks/wheels
mkdir -p "$dest"
# Pure-Python diffusers (the version cogdist is tested with), torchao's abi3 wheel (any CPython
# >= 3.10), and importlib_metadata, which diffusers declares.
python -m pip download --quiet --no-deps --dest "$dest" "diffusers==0.42.1" "torchao==0.18.0" "importlib_metadata"
du -sh "$dest"
