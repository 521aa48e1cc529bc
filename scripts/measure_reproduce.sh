#!/usr/bin/env bash
# The paper's evaluation, Tables 1-6 and Figure 6 beside the paper's own figures, at the cpu profile's sizes (69
# minutes on 2 CPU cores, 2026-12-02): writes runs/reproduce-cpu/report.html, report.md (the section of
# docs/RESULTS.md) and results.json. Rerunning resumes where an
# interrupted run stopped. Needs ../shared, Fashion-MNIST (apt-get install dataset-fashion-mnist) and matplotlib
# (pip install 'cnnmod[report]'); pass --cifar100 cifar-100-python/ for the CIFAR-100 rows.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
cnnmod reproduce --out runs/reproduce-cpu --profile cpu "$@"
