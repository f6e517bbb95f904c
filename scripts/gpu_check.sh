#!/usr/bin/env bash
# GPU proof for the memory modes and the VRAM ledger (issue 10). Run from anywhere on a CUDA machine:
#
#     scripts/gpu_check.sh [OUTPUT_DIR]        # default: $OUT when set, else ./gpu-check
#
# 1. Packages the GPU image lacks (diffusers, omegaconf, ftfy, invisible-watermark and what they need)
#    are installed from the wheels in .whl/ (no network): make them on a machine with pip, once, with
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#          -d .whl diffusers==0.42.1 omegaconf==2.4.0 ftfy==6.3.1 wcwidth==0.7.0 invisible-watermark==0.2.0 \
#          PyWavelets==1.9.0 importlib_metadata==8.7.0
#    (.whl/ is git-ignored; carry it to the GPU machine with the working tree.)
# 2. The CUDA tests (tests that skip without CUDA, and the ledger's).
# 3. scripts/gpu_check.py: every mode's max_memory_allocated and time at 512, 768 and 1024 px next to the
#    ledger's prediction (the same calls on the meta device).
# 4. scripts/benchmark.py --device cuda: the command-line generator end to end next to diffusers
#    (resident, model offload, group offload), 512 px, batch 1.
# 5. The same, ours alone with --deepcache 3 in full and low mode, per step (issue 26: low mode's time per
#    step within 1.3x of full mode's, since a cached step streams only the shallow blocks).
# Everything is printed and written under OUTPUT_DIR (gpu-check.txt, ledger.json, benchmark.json): paste
# the tables into docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
log="$out/gpu-check.txt"
export PYTHONUNBUFFERED=1
step() { echo; echo "## $*" | tee -a "$log"; }

if ! python3 -c "import diffusers, omegaconf, ftfy, imwatermark" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: diffusers/omegaconf/ftfy/invisible-watermark missing and no wheels in .whl/ (see the header)" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_check: no CUDA device" >&2; exit 2; }
status=0

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } 2>&1 | tee -a "$log"

step "CUDA tests: python3 -m pytest -q tests/test_residency.py tests/test_vram_ledger.py"
python3 -m pytest -q -p no:cacheprovider tests/test_residency.py tests/test_vram_ledger.py 2>&1 | tail -n 25 | tee -a "$log" || status=1

step "ledger vs measured: python3 scripts/gpu_check.py --sizes 512 768 1024"
python3 scripts/gpu_check.py --sizes 512 768 1024 --json "$out/ledger.json" 2>&1 | tee -a "$log" || status=1

step "end to end vs diffusers: python3 scripts/benchmark.py --device cuda --batch 1"
python3 scripts/benchmark.py --device cuda --batch 1 --modes full medium low \
    --diffusers_modes resident model_offload group_offload --json "$out/benchmark.json" 2>&1 | tee -a "$log" || status=1

step "DeepCache, low vs full mode: python3 scripts/benchmark.py --device cuda --modes full low --deepcache 3 --per_step"
python3 scripts/benchmark.py --device cuda --batch 1 --modes full low --deepcache 3 --per_step --skip_diffusers \
    --json "$out/deepcache.json" 2>&1 | tee -a "$log" || status=1

echo; echo "gpu_check: done (exit $status); log in $log"
exit $status
