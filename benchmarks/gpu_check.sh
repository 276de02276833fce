#!/usr/bin/env bash
# GPU check: train/loader/ceiling/resume/DDP/predictions/web on one GPU in <= 8 minutes,
# written to benchmarks/results/gpu.md (and copied to $OUT when the device tool sets it).
#   bash benchmarks/gpu_check.sh             on the GPU machine (no network: uses its python3 with torch)
#   bash benchmarks/gpu_check.sh --dry-run   the same steps on the CPU with tiny sizes
# PY picks the interpreter (default python3). The GPU machine lacks flask, pydicom, waitress...: when $PY cannot
# import them and cp312 wheels were carried in .whl/, they are installed into /tmp/site first (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import flask, flask_wtf, pydicom, waitress" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "error: $PY lacks flask/pydicom/waitress and there are no wheels in .whl/ to install offline" >&2
        exit 2
    fi
fi
export PYTHONUNBUFFERED=1
exec $PY benchmarks/gpu_check.py "$@"
