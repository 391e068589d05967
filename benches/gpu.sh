#!/usr/bin/env bash
# Everything for a lent GPU machine, in one call of at most 8 minutes; logs and tables under $OUT.
#   bash benches/gpu.sh            on the GPU (OUT defaults to benches/results)
#   bash benches/gpu.sh --smoke    the same steps at tiny shapes on a CPU, Triton under its
#                                  interpreter (CI runs this so the script cannot rot)
# Steps and their time limits: install 60 s, tests 120 s, ops benchmark 110 s, fused linear head
# 45 s, the same with the full KL to a reference head 25 s, batch-invariant forward and decode 30 s,
# hybrid rollout 45 s, trainer steps 45 s (8 minutes in all). Carried wheels in .whl/ (deepspeed,
# liger-kernel: see benches/README.md) are installed first.
set -uo pipefail

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
# The time limits are the GPU's budget. At tiny shapes on a CPU a step's fixed costs (imports, the
# benchmarks' child processes, the interpreter) are all there is, and take longer: three times the limit.
limit() { echo $(( $1 * (smoke ? 3 : 1) )); }
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "$smoke" = 1 ]; then
    out=${OUT:-$(mktemp -d)}
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    out=${OUT:-$repo/benches/results}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
# The benches run from a copy without .git: every results file records the commit measured from this.
PPO_FAST_BENCH_COMMIT=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
[ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ] && PPO_FAST_BENCH_COMMIT+="+dirty"
export PPO_FAST_BENCH_COMMIT
# Inductor's background compile workers would compete with the timed code for CPU.
export TORCHINDUCTOR_COMPILE_THREADS=1

# The package is installed the way a user installs it (a wheel built from the checkout, kernels/
# mapped to ppo_fast.kernels by setup.py) and everything runs from a copy of the tests, benches and
# scripts that holds no ppo_fast/ folder, so the installed package is the one that runs.
site=$(mktemp -d)
wheels=()
# Carried wheels are for the GPU image's Python; a smoke run uses what its environment has.
if [ "$smoke" = 0 ] && compgen -G "$repo/.whl/*.whl" >/dev/null; then wheels=("$repo"/.whl/*.whl); fi
timeout "$(limit 60)" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --no-build-isolation --target "$site" "${wheels[@]}" "$repo" 2>&1 | tee "$out/install.log" \
    || { echo "gpu.sh: installing ppo_fast failed (see install.log)"; exit 1; }
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
run_tree=$(mktemp -d)
cp -r "$repo/tests" "$repo/benches" "$repo/scripts" "$repo/pyproject.toml" "$run_tree/"
cd "$run_tree" || exit 1

if [ "$smoke" = 1 ]; then
    device_args=()
    # The default tier has run these; the smoke checks the step runs.
    tests=(tests/test_api.py::test_readme_contract_runs_on_cpu
           tests/test_api.py::test_every_public_op_compiles_in_one_graph)
    bench=(--smoke)
    rollout=(--preset tiny --batch-size 2 --max-new-tokens 8 --repeats 1)
    train=(--steps 2 --warmup-steps 20 --reward-train-steps 20 --rollout-batch-size 8
           --minibatch-size 8 --micro-batch-size 8 --eval-prompts 8)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_info.log"
    # The GPU image has no ninja to build the native CPU kernels with (CI builds and tests them);
    # switched off, CPU calls here run the reference and nothing waits on a build.
    device_args=(PPO_FAST_TEST_DEVICE=cuda PPO_FAST_NATIVE=0)
    # The op tests first, so a slow launcher test cannot starve them of the test budget.
    tests=(tests/test_backends.py tests/test_batch_invariant_triton.py tests/test_linear_head.py
           tests/test_full_kl.py tests/test_objectives.py tests/test_sum_pi_squared.py tests/test_head.py tests/test_api.py
           tests/test_reference.py tests/test_hybrid.py tests/test_trainer.py tests/test_scripts.py)
    bench=()
    rollout=(--preset 50m --batch-size 32 --max-new-tokens 128)
    train=(--steps 4 --warmup-steps 60 --reward-train-steps 120)
fi
python3 -c "import ppo_fast, torch, triton; print('ppo_fast from', ppo_fast.__file__); \
print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$out/gpu_info.log"

if [ "$smoke" = 1 ]; then
    # DeepSpeed builds its CPU shared-memory op on first use (about a minute on 2 cores). Built here,
    # untimed: a time limit that killed the build would leave its lock behind, and every later
    # deepspeed run on the machine would wait on it for ever.
    python3 -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1
fi

# verl is not on the GPU image: its comparisons run in CI (tests/integrations and -k verl).
# Both tiers: on a GPU the launcher and trainer tests are the ones CI cannot run.
env "${device_args[@]}" timeout "$(limit 120)" python3 -m pytest "${tests[@]}" -k "not verl" -m "slow or not slow" -q -p no:cacheprovider -rfEs \
    2>&1 | tee "$out/gpu_tests.log"
tests_rc=$?

timeout "$(limit 110)" python3 benches/gpu_bench.py "${bench[@]}" --out "$out" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=$?

# The fused linear head against the logits paths and Liger: time and peak extra memory.
timeout "$(limit 45)" python3 benches/linear_head.py "${bench[@]}" --out "$out" 2>&1 | tee "$out/linear_head.log"
linear_rc=$?
# The same loss with the full KL to a reference head: the Triton KL kernels against its GEMM path
# and the logits path.
timeout "$(limit 25)" python3 benches/linear_head.py "${bench[@]}" --full-kl --out "$out" 2>&1 \
    | tee "$out/linear_head_full_kl.log"
full_kl_rc=$?

# batch_invariant() off vs on: forward and decode of a Qwen2-0.5B-shaped model (the smoke: a tiny
# one on the CPU's native kernels).
env "${device_args[@]}" timeout "$(limit 30)" python3 benches/bench_batch_invariant.py "${bench[@]}" --rounds 3 \
    --out "$out/batch_invariant_gpu.md" 2>&1 | tee "$out/batch_invariant.log"
invariant_rc=$?

# Hybrid engine on one device: one process, ZeRO-3, plain generate vs gather-once + our decode.
timeout "$(limit 45)" python3 benches/rollout.py --zero-stage 3 "${rollout[@]}" --compare \
    --out "$out/hybrid.md" 2>&1 | tee "$out/hybrid.log"
rollout_rc=$?

# The trainer end to end on the embedded task (bf16 on a GPU): tokens/s per phase in the summary.
timeout "$(limit 45)" python3 -m ppo_fast.cli train "${train[@]}" --output-dir "$run_tree/runs" \
    --run-name gpu 2>&1 | tee "$out/trainer.log"
train_rc=$?
cp "$run_tree/runs/gpu/summary.json" "$out/trainer_summary.json" 2>/dev/null

echo "gpu.sh: tests exit $tests_rc, bench exit $bench_rc (3 = a goal failed), linear head exit" \
     "$linear_rc, full KL exit $full_kl_rc, batch-invariant exit $invariant_rc, rollout exit $rollout_rc," \
     "trainer exit $train_rc; results in $out"
for rc in "$tests_rc" "$linear_rc" "$full_kl_rc" "$invariant_rc" "$rollout_rc" "$train_rc"; do
    [ "$rc" -ne 0 ] && exit "$rc"
done
# A smoke run's timings mean nothing, so its goals may fail; the script itself must not.
if [ "$smoke" = 1 ] && [ "$bench_rc" -eq 3 ]; then exit 0; fi
exit "$bench_rc"
