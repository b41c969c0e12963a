#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one call of the device tool (one warm machine, one
# lease): the CycleGAN training ladder (issue 3), the tumor GAN (issue 4) and the gate at
# 10,000 vs 10,000 images (issue 5). Each benchmark writes its Markdown table under $OUT and
# has its own time limit, so one that fails or hangs does not cost the others.
#
# The device's python3 (3.12, torch 2.11) lacks MONAI, nibabel and pydantic: fetch them as
# wheels here first (`bench/gpu.sh --wheels`, into .whl/, which git ignores through
# .git/info/exclude), then through the device tool:
#
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
#
# The tables come back as $OUT/*.md; copy them into bench/RESULTS.md with the date and device.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0)  # pydantic needs >= 4.16

if [[ "${1:-}" == "--wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

OUT="${OUT:-bench/_work/gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
PY=python3

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"; } \
    2>&1 | tee "$OUT/device.txt"

# seconds per benchmark: together 490 s, inside the device tool's 10-minute command limit and
# leaving room in a 15-minute lease for the machine's start; each script prints its rows as it
# measures them, so one stopped by its limit still returns what it measured
run_bench() {  # name limit_s script args...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" $PY "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    echo "   exit $? ($(wc -l < "$OUT/$name.md") lines of table)"
    tail -n 3 "$OUT/$name.log"
}
run_bench cyclegan_bench 240 bench/cyclegan.py
run_bench tumor_gan_bench 100 bench/tumor_gan.py
run_bench gate_bench 150 bench/gate.py --device cuda --n 10000 --size 256
