#!/usr/bin/env bash
# The GPU suite (issue 14) on a machine with torch and torchvision but not pycocotools: installs the
# wheels of .whl/ (fetched beforehand by ../shared/tools/gpu-wheels.sh) if there are any, then runs
# benchmarks/gpu_suite.py with the arguments given (default budget 420 s; output $OUT, else var/gpu_suite/).
# Usage, from anywhere: bash benchmarks/gpu_suite.sh [--budget-s 420] [--out DIR] [--steps 1,2,3,4,5]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu_suite.sh: installing .whl/*.whl failed; the steps that need them will record the error"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_suite.sh: no .whl/*.whl here; pycocotools and ensemble-boxes only if already installed"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_suite.py "$@"
