#!/usr/bin/env bash
# Every GPU check of this project in one call on a lent GPU machine (BENCHMARKS.md records what it printed).
#
#   bash bench/device_pack.sh                        # here: what that machine lacks, into .dev/
#   device run, carry [".dev"]: bash bench/device_checks.sh [deadline_s]
#
# In order of importance, each step bounded so that all of them end within the deadline (default 540 s):
# the CUDA tests (pytest -m gpu), the device's faces against the CPU's (bench/detect_agreement.py), GFP-GAN
# faces/s, the device's side of an image (bench/device_side.py), the whole job against the official
# sequential way (with the job's defaults: faces found on the device), the CPU side on this machine's cores,
# and the job with faces found on the CPUs, then with derivatives made on the device. Logs go to $OUT (one
# file per step: the device tool brings back 8); the last lines of each and a summary are printed.
set -u
t0=$(date +%s)
deadline=$((t0 + ${1:-540}))
OUT=${OUT:-$(mktemp -d)}
summary=$(mktemp)
export PYTHONUNBUFFERED=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 PYTHONPATH=$PWD
PY=${PY:-python3}
# The packed site is CPython 3.12's (that machine's); elsewhere the installed packages serve.
if [ -f .dev/site.tar.xz ] && $PY -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    mkdir -p /tmp/site && tar -xJf .dev/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
fi
if [ -f .dev/shared.tar.xz ]; then
    mkdir -p /tmp/shared && tar -xJf .dev/shared.tar.xz -C /tmp/shared && export ARCHIVE_SHARED_DIR=/tmp/shared
fi

step() {  # step NAME LIMIT_S COMMAND...: at most LIMIT_S, never past the deadline
    local name=$1 limit=$2 left s rc
    shift 2
    left=$((deadline - $(date +%s) - 15))  # timeout's -k 10 included
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped, ${left}s left" | tee -a "$summary"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    s=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - s))s" | tee -a "$summary"
    tail -n "${TAIL:-4}" "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    nproc
    $PY -c "import sys, torch, torchvision, cv2, numpy, pyarrow, pandas, ray, pydantic, facexlib, onnxruntime
print(sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cv2', cv2.__version__,
      'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__, 'pandas', pandas.__version__, 'ray', ray.__version__,
      'pydantic', pydantic.__version__, 'onnxruntime', onnxruntime.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.log"

TAIL=12 step pytest_gpu 150 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gfpgan.py tests/test_accel.py \
    tests/test_restorer.py tests/test_devicefaces.py tests/test_devicepaste.py
TAIL=8 step agreement 60 $PY bench/detect_agreement.py
TAIL=16 step gfpgan 150 $PY bench/gfpgan_throughput.py --faces 512 --fp32-faces 64 --repeat 3
TAIL=16 step device_side 100 $PY bench/device_side.py
TAIL=4 step pipeline 150 $PY bench/pipeline_throughput.py --repeat 16
TAIL=14 step cpu_side 90 $PY bench/cpu_side.py --mp 12 --formats jpeg --repeats 3
# One log for both variants (the device tool brings back 8 files); faces found on the CPUs first (the
# alternative to the default), each variant's exit status said, the step failing if either fails.
TAIL=8 step pipeline_variants 200 bash -c "$PY bench/pipeline_throughput.py --repeat 8 --no-baseline \
    --set detect.device=cpu; a=\$?; $PY bench/pipeline_throughput.py --repeat 8 --no-baseline \
    --set output.device=gpu; b=\$?; echo \"variants: detect.device=cpu rc \$a, output.device=gpu rc \$b\"; \
    [ \$a -eq 0 ] && [ \$b -eq 0 ]"
echo "== summary ($(($(date +%s) - t0))s)"
cat "$summary"
