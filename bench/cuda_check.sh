#!/usr/bin/env bash
# The CUDA checks, in one short run on a machine with an NVIDIA GPU (run from the repository root):
#
#   bash bench/cuda_check.sh            # results under $OUT (default /tmp/cuda-check)
#
# 1. the tests parametrised over devices, at their cuda ids (tests/conftest.py DEVICES);
# 2. the whole test suite with CUDA visible (every path that picks the GPU when there is one: Trainer,
#    the evaluate stage, precision "auto" = bf16 on the GPU), in parallel workers;
# 3. the smoke study (parameters/smoke.yaml: every stage kind through papermill) on the GPU;
# 4. the stage-speed benchmark at the smoke study's shapes (the CUDA code path of each stage kind).
#
# Where the machine has no network, the Python packages it lacks travel as one archive,
# .gpu/site.tar.xz (a `pip install --target` of the wheels, unpacked to /tmp/site here).
# Each part has its own time limit, so one that hangs cannot take the others' time.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PTQLIB_CACHE=/tmp/ptqlib-cache
if [ -f .gpu/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz
  # nbconvert's HTML templates sit in the archive's share/jupyter (pip --target puts data files there)
  export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter
else
  export PYTHONPATH=$PWD
fi
PY=${PY:-python3}
nvidia-smi -L
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import torch, transformers, peft, bitsandbytes
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)
EOF
$PY -m ipykernel install --user --name ptqlib --display-name "Python (ptqlib)" >/dev/null

part() {  # part NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, print its tail and status
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-15}" "$OUT/$name.log"
}

part cuda-tests "${CUDA_TESTS_S:-90}" $PY -m pytest -q -p no:cacheprovider -k cuda tests
TAIL=40 part suite "${SUITE_S:-180}" $PY -m pytest -q -p no:cacheprovider -n "${WORKERS:-12}" -m "not slow" tests
part smoke-study "${SMOKE_S:-120}" $PY -m ptqlib run parameters/smoke.yaml --runs /tmp/runs --reports /tmp/reports
cp /tmp/reports/smoke/results.csv "$OUT/smoke-results.csv" 2>/dev/null
TAIL=30 part stage-speed "${SPEED_S:-80}" $PY bench/stage_speed.py --quick --study parameters/smoke.yaml
