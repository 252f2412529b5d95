#!/usr/bin/env bash
# Installs the reference libraries the benchmarks compare against, without replacing the CPU torch:
# backpack-for-pytorch (needed by curvlinops) requires torchvision, which would pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install torch==2.13.0
python3 -m pip install -e ".[benchmarks]"
python3 -m pip install --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
    unfoldNd==0.2.3 einconv==0.1.0 einops==0.8.2 opt-einsum==3.4.0 linear_operator==0.6.1
