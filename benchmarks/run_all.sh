#!/usr/bin/env bash
# Run every benchmark one after another (never in parallel: they time the CPU). Each writes its figures under
# benchmarks/results/; BENCHMARKS.md quotes them in sections written by hand (with the context a reader needs), so
# nothing here overwrites it: compare the new results files with `git diff benchmarks/results` and update its text.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/bench_predict.py
$PY benchmarks/bench_web.py
$PY benchmarks/bench_cache.py
$PY benchmarks/bench_load.py
$PY benchmarks/bench_load.py --healthz-run
$PY benchmarks/bench_memory.py
$PY benchmarks/bench_cpu.py
$PY benchmarks/bench_batch.py
$PY benchmarks/bench_web.py --backend onnx --out benchmarks/results/web-onnx.md
# int8 gate needs a trained checkpoint: $PY benchmarks/int8_gate.py --checkpoint CKPT --data-dir DIR
$PY benchmarks/bench_scope_time.py
$PY benchmarks/bench_startup.py
$PY benchmarks/bench_drift.py
$PY benchmarks/bench_drift.py --alpha 0.001 --out benchmarks/results/drift-alpha1e-3.md
# The in-scope and calibration figures need a model trained on the sample (docs/TRAINING.md's smoke command) and fitted.
SMOKE=${SMOKE:-/tmp/chestxray-smoke.pth}
TRAIN="Model_Training/train.py --data-dir ../shared/data/nih --image-size 64 --epochs 2 --no-pretrained --device cpu"
[ -f "$SMOKE" ] || $PY $TRAIN --output "$SMOKE" --no-progress
$PY benchmarks/bench_scope.py --checkpoint "$SMOKE" --data-dir ../shared/data/nih --command "$TRAIN"
echo "figures written under benchmarks/results/ (git diff benchmarks/results); BENCHMARKS.md is updated by hand"
