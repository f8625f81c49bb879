#!/usr/bin/env bash
# The GPU checks of the MAML performance work, as one script (sized for ~8 minutes on one H100):
# the meta-training step (meta-batch 16), a 1,000-episode full-width evaluation, and ACDC vs dense; on a
# machine with several GPUs also meta-training and the test under torchrun on 1 and on all of them.
# Results go to benchmarks/results/cuda/ (or $OUT/cuda when $OUT is set, e.g. on a lent device).
#
#     bash benchmarks/cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-benchmarks/results}/cuda"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$dest/gpu.txt"
python benchmarks/maml_step.py --device cuda --meta-batch 16 --rounds 5 \
    --contenders ours ours_vmap higher floor bound --out "$dest/maml_step.json"
python benchmarks/evaluate.py --device cuda --width 64 --image-size 84 --acdc none \
    --episodes 1000 --batch 50 --out "$dest/evaluate_resnet10_84px.json"
python benchmarks/acdc_overhead.py --device cuda --batch 256 80 5 --out "$dest/acdc_overhead.json"
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -gt 1 ]; then python benchmarks/torchrun_scaling.py --device cuda --processes 1 "$gpus" \
    --out "$dest/torchrun_scaling.json"; fi
