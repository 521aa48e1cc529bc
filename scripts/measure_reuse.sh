#!/usr/bin/env bash
# Reproduces the figures of the reuse/replace/repair issue's closing note (about 50 minutes on 2 CPU cores).
# Needs ../shared, Fashion-MNIST (apt-get install dataset-fashion-mnist) and the weaker parent of
# scripts/measure_core.sh (runs/resnet20_nobn-cifar10.safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
cnnmod experiment intra-reuse --epochs 10 --out runs/exp_intra_reuse > runs/exp_intra_reuse.txt
cnnmod experiment intra-reuse --epochs 20 --out runs/exp_intra_reuse_20 > runs/exp_intra_reuse_20.txt
cnnmod experiment inter-reuse --epochs 10 --out runs/exp_inter_reuse > runs/exp_inter_reuse.txt
cnnmod experiment intra-replace --weak runs/resnet20_nobn-cifar10.safetensors --out runs/exp_intra_replace \
  > runs/exp_intra_replace.txt
cnnmod experiment inter-replace --out runs/exp_inter_replace > runs/exp_inter_replace.txt
cnnmod experiment repair --epochs 30 --out runs/exp_repair > runs/exp_repair.txt
