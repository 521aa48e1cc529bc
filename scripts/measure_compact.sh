#!/usr/bin/env bash
# Reproduces the figures of docs/RESULTS.md's section on compact modules (issue 11): about 60 minutes on 2 CPU
# cores (each decomposition at most 15). Every job runs niced, one at a time, on at most 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
S=../shared
C10=$S/data/cifar10-jpg.tar.gz
R20=$S/models/resnet20-12fca82f.th
W=runs/compact
export OMP_NUM_THREADS=2
run() { nice -n 10 "$@"; }
mkdir -p $W
# the default: decompose (cost next to training the parent), evaluate every engine, sizes, inference time
run /usr/bin/time -v cnnmod decompose $R20 --arch resnet20 --data $C10 --out stores/r20-compact --method compact \
  --overwrite --json > $W/decompose.json 2> $W/decompose.time
run cnnmod evaluate stores/r20-compact --data $C10 --json > $W/evaluate.json
run cnnmod inspect stores/r20-compact --json > $W/inspect.json
run python benchmarks/compose_cost.py --method compact --store stores/r20-compact > $W/compose_cost.txt
run python benchmarks/compose_cost.py --method compact --limit 2000 --batchings > $W/compose_cost_shapes.txt
# where the composed time goes: the ten modules' own layers against the parent's layers after the shared prefix
run python benchmarks/compose_tail.py > $W/compose_tail.txt
run python benchmarks/compose_tail.py --batching grouped > $W/compose_tail_grouped.txt
run python benchmarks/conv_widths.py > $W/conv_widths.txt
# the fine-tune with its prefix cache against without, side by side on 5,000 training images
run python benchmarks/compact_prefix_cache.py > $W/prefix_cache.txt
# the per-class passes before the fine-tune at 40 classes: importance and recalibration, old against new
run python benchmarks/compact_classes.py > $W/compact_classes.txt
# the same modules kept as float32 (twice the file bytes; the same fine-tune, unrounded)
run cnnmod decompose $R20 --arch resnet20 --data $C10 --out stores/r20-compact-f32 --method compact \
  --weights-dtype float32 --overwrite --json > $W/decompose-f32.json
run cnnmod evaluate stores/r20-compact-f32 --data $C10 --json > $W/evaluate-f32.json
run cnnmod inspect stores/r20-compact-f32 --json > $W/inspect-f32.json
# the frontier: kept parameters against composed top-1 at other keep fractions (40,000 fine-tune images each;
# the energy share is not what these runs measure, so the parent's training epoch is the quick estimate)
for keep in 0.125 0.25 0.375 0.5; do
  run cnnmod decompose $R20 --arch resnet20 --data $C10 --out stores/r20-compact-$keep --method compact \
    --stream-keep $keep --inner-keep $keep --train-images 40000 --training-epoch steps --overwrite --json \
    > $W/frontier-$keep.json
  run cnnmod evaluate stores/r20-compact-$keep --data $C10 --json > $W/frontier-$keep-evaluate.json
done
