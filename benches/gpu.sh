#!/usr/bin/env bash
# One command for the GPU machine: GPU tests, then benches/gpu_bench.py; logs under $OUT.
#   bash benches/gpu.sh            (from the repository root; OUT defaults to benches/results)
# Budget: tests 150 s + bench 240 s + rollout 75 s (timeouts) = 465 s, inside one 8-minute call.
# Kernel tests run first so that a slow launcher test cannot starve them of the test budget.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/benches/results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
# Inductor's background compile workers would compete with the timed code for CPU.
export TORCHINDUCTOR_COMPILE_THREADS=1

if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$repo"/.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# setuptools maps ppo_fast.kernels to the top-level kernels/, so the source tree alone does not
# import; a copy with kernels/ placed inside the package does, with no install and no network.
# Running from that copy also keeps the checkout's ppo_fast/ from shadowing it on sys.path.
run_tree=/tmp/ppo_fast_run
rm -rf "$run_tree" && mkdir -p "$run_tree"
tar -C "$repo" --exclude=./.git --exclude=./.whl --exclude='*.egg-info' --exclude=./build \
    -cf - . | tar -C "$run_tree" -xf -
rm -rf "$run_tree/ppo_fast/kernels" && cp -r "$repo/kernels" "$run_tree/ppo_fast/kernels"
export PYTHONPATH=$run_tree${PYTHONPATH:+:$PYTHONPATH}
cd "$run_tree" || exit 1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_info.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$out/gpu_info.log"

test_files=(tests/test_kernels.py tests/test_reference.py tests/test_api.py)
for f in tests/test_*.py; do [[ " ${test_files[*]} " == *" $f "* ]] || test_files+=("$f"); done
PPO_FAST_TEST_DEVICE=cuda timeout 150 python3 -m pytest "${test_files[@]}" -x -q -p no:cacheprovider 2>&1 \
    | tee "$out/gpu_tests.log"
tests_rc=$?
# pytest exits 5 when it collects nothing: report it, but still run the benchmark.
[ "$tests_rc" -eq 5 ] && echo "gpu.sh: no tests collected under tests/" | tee -a "$out/gpu_tests.log"

timeout 240 python3 benches/gpu_bench.py --out "$out" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=$?

# Hybrid engine on one GPU: one process, ZeRO-3, plain generate vs gather-once + our decode loop.
# deepspeed is not in the GPU image: carry its wheels in .whl/ (see benches/README.md).
rollout_rc=0
if python3 -c "import deepspeed" 2>/dev/null; then
    timeout 75 python3 -m ppo_fast.cli rollout --zero-stage 3 --preset 50m --batch-size 32 \
        --max-new-tokens 128 --compare --out "$out/hybrid_gpu.md" 2>&1 | tee "$out/hybrid_gpu.log"
    rollout_rc=$?
else
    echo "gpu.sh: deepspeed not importable, hybrid-engine rollout skipped" | tee "$out/hybrid_gpu.log"
fi

echo "gpu.sh: tests exit $tests_rc, bench exit $bench_rc (1 = a goal failed), rollout exit $rollout_rc"
if [ "$tests_rc" -ne 0 ] && [ "$tests_rc" -ne 5 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
