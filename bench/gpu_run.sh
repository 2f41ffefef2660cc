#!/usr/bin/env bash
# Everything measured on the GPU machine, in one go: the GPU-marked tests, bench.gpu, the engine sweep
# on the CUDA provider, and the batching benchmark on that machine's 16 CPU cores (mlp on the CPU).
#
#   bash bench/gpu_run.sh OUT_DIR
#   STEPS="tests gpu batching" bash bench/gpu_run.sh OUT_DIR   # a subset (default: all five steps)
#   FRONTENDS=1,4,8: the frontend process counts bench.gpu compares (the default)
#   COMPARE=DIR: bench.gpu also runs another checkout's `service` side by side (--compare-with)
#   CLIENT_PROCESSES=N: load-generator processes of bench.gpu (default 16: on the 16-core H200 VMs 8 left (a)
#   short of clients, bench/results/gpu/runs/26)
#   ROUNDS=N: bench.gpu's alternating rounds (default 2; its verdict takes the median)
#
# Needs onnxruntime-gpu (CUDAExecutionProvider), cuda-python and the packages of `pip install -e .`
# importable by python3 (on the device they are staged: see bench/results/gpu/REPORT-gpu.md for how).
# Each step has its own time limit so that one slow step cannot take the others' results with it.
set -u
out=${1:?usage: bash bench/gpu_run.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
{ nvidia-smi -L; nproc; $py --version; } > "$out/machine.txt" 2>&1
$py examples/generate_models.py --out examples/models > /dev/null
steps=" ${STEPS:-tests sweep shapes gpu batching} "
step() { [[ "$steps" == *" $1 "* ]]; }
step tests && { timeout 90 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_buffer_pool.py \
    tests/test_gpu_server.py tests/test_onnxruntime_engine.py tests/test_onnxruntime_plans.py tests/test_registry.py \
    tests/test_tensorrt_backend.py > "$out/gpu-tests.log" 2>&1
    echo "gpu tests: exit $?" | tee -a "$out/gpu-tests.log"; }
step sweep && { timeout 240 $py -m bench.engine_sweep --gpu --out "$out" > "$out/engine_sweep.log" 2>&1
                echo "engine sweep: exit $?"; }
step shapes && { timeout 60 $py -m bench.cuda_shapes --out "$out/cuda_shapes.md" > "$out/cuda_shapes.log" 2>&1
                 echo "bench.cuda_shapes: exit $?"; }
step gpu && { timeout 900 $py -m bench.gpu --seconds 8 --frontend-processes "${FRONTENDS:-1,4,8}" --out "$out" \
    --client-processes "${CLIENT_PROCESSES:-16}" --rounds "${ROUNDS:-2}" \
    ${PY_SPY:+--py-spy "$PY_SPY"} ${COMPARE:+--compare-with "$COMPARE"} > "$out/gpu.log" 2>&1
    echo "bench.gpu: exit $?"; }
# issue 5's benchmark with 4 frontend processes, 1 and 4 ONNX Runtime threads (BATCHING_CLIENTS: 1,8,32 for all)
step batching && for t in 1 4; do
    timeout 150 $py -m bench.batching --quick --frontend-processes 4 --intra-op-threads $t \
        --clients "${BATCHING_CLIENTS:-32}" --out "$out/batching-$(nproc)core-4fe-${t}t.md" > "$out/batching-$t.log" 2>&1
    echo "bench.batching --frontend-processes 4 --intra-op-threads $t (CPU cores of the GPU machine): exit $?"
done
