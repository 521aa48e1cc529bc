#!/usr/bin/env bash
# Reproduces the figures of the core issue's closing note (about 30 minutes on 2 CPU cores).
# Needs ../shared and a ResNet-20 without BatchNorm trained by:
#   cnnmod train resnet20_nobn --data ../shared/data/cifar10-jpg.tar.gz --epochs 10 --lr 0.1 \
#     --out runs/resnet20_nobn-cifar10.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
S=../shared
C10=$S/data/cifar10-jpg.tar.gz
mkdir -p runs
cnnmod variants $S/models/resnet20-12fca82f.th --arch resnet20 --data $C10 > runs/table1_resnet20.md
cnnmod variants runs/resnet20_nobn-cifar10.safetensors --data $C10 > runs/table1_resnet20_nobn.md
cnnmod variants $S/models/resnet56-4bfd9763.th --arch resnet56 --data $C10 > runs/table1_resnet56.md
cnnmod decompose $S/models/resnet20-12fca82f.th --arch resnet20 --data $C10 --method paper --out stores/r20 --overwrite
cnnmod tradeoff stores/r20 --data $C10 --limit 2000 --out runs/tradeoff_resnet20 > runs/tradeoff_resnet20.txt
python benchmarks/decompose_cost.py > runs/decompose_cost.txt
python benchmarks/compose_cost.py > runs/compose_cost.txt
