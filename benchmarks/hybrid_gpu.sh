#!/usr/bin/env bash
# The CPU/GPU hybrid on a real NVIDIA GPU, in one run of a few minutes: the hybrid and kernel tests on the device
# (not numba's simulator), the decode table on a TinyLlama-shaped planted-sparsity Q4_0 model (CPU dense, CPU
# sparse, hybrid at 10, 25, 50 and 100% of the model's device bytes) beside its byte ceiling (hybrid_ceiling.py), then
# the overlap of the GPU and CPU halves. The plans rank neurons by their keep frequency, measured at first use.
#     benchmarks/hybrid_gpu.sh [OUTDIR]        (PRESET=tiny for a dry run; THREADS=N for the CPU's threads;
#                                              NO_LLAMA_CPP=1 where llama-cpp-python is not installed)
set -u
out=${1:-hybrid-gpu}
preset=${PRESET:-tinyllama}
model=${MODEL:-/tmp/hybrid-$preset-Q4_0.gguf}
t=${THREADS:+-t $THREADS}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=${NUMBA_ENABLE_CUDASIM:-0}
step() { echo "$(date +%T) $*" | tee -a "$out/steps.log"; }

step machine
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    grep -m1 "model name" /proc/cpuinfo; nproc; grep -o -w "avx2\|avx512f\|avx512_vnni\|avx_vnni" /proc/cpuinfo | sort -u | tr '\n' ' '
    python3 -c "import numba; from numba import cuda; print('numba', numba.__version__); print(cuda.get_current_device().name)"
} > "$out/machine.txt" 2>&1

if [ ! -f "$model" ]; then  # written meanwhile on other cores
    step "make $model"
    timeout 150 python3 -m models.make_test_model "$model" --preset "$preset" --type Q4_0 --planted-sparsity 0.9 \
        > "$out/make.log" 2>&1 &
fi

step tests
# (without llama-cpp-python, the tests that tokenize text or quantize K-quants with llama.cpp are left out)
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_hybrid.py \
    ${NO_LLAMA_CPP:+-k "not place_cli and not Q4_K_M and not bench_hybrid"} > "$out/tests.log" 2>&1
step "tests rc $?"
wait

step ceiling
timeout 60 python3 benchmarks/hybrid_ceiling.py "$model" --budget 0.1 0.25 0.5 1 > "$out/ceiling.md" 2>&1
step "ceiling rc $?"

step bench
timeout 200 python3 -m sparserun.cli bench "$model" -n 32 -p 0 -r 3 $t --fidelity-tokens 0 --sparsity threshold:0 \
    --modes dense,sparse,hybrid:0.1,hybrid:0.25,hybrid:0.5,hybrid:1 --json "$out/bench.json" > "$out/bench.md" 2>&1
step "bench rc $?"

step overlap
timeout 130 python3 benchmarks/hybrid_overlap.py "$model" --budget 0.1 0.25 0.5 1 -n 16 $t > "$out/overlap.md" 2>&1
step "overlap rc $?"

step "bench, 4 threads (a laptop's cores)"
timeout 150 python3 -m sparserun.cli bench "$model" -n 32 -p 0 -r 3 -t 4 --fidelity-tokens 0 --sparsity threshold:0 \
    --modes dense,sparse,hybrid:0.1,hybrid:0.25,hybrid:0.5,hybrid:1 > "$out/bench-t4.md" 2>&1
step "bench-t4 rc $?"
