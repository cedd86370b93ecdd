#!/usr/bin/env bash
# The checks that need a CUDA device, in one run of about 6 minutes on one GPU (measured on an H200):
#   1. the gpu-marked tests: greedy output equal to plain decoding for every shipped drafter
#      (chains and trees, batch 1 and 4), the sampling distribution tests, the device-clean rules
#      with real CUDA tensors, and tp=2 over NCCL where two GPUs exist;
#   2. a short benchmark on the default model: plain vs each shipped drafter, tokens/s and τ.
# Usage: scripts/gpu-check.sh OUT_DIR   (figures, logs and the test report land in OUT_DIR)
# Needs a CUDA build of torch (the CPU setup's torch cannot see a GPU): this script checks first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out"

python - <<'EOF' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" || true

# gRPC stubs (the worker tests import them), as scripts/setup.sh makes them; a machine without
# grpcio-tools uses stubs generated elsewhere and carried in tandem_proto/v1.
if python -c "import grpc_tools" 2>/dev/null; then
    python scripts/gen_proto.py
else
    test -f tandem_proto/v1/worker_pb2.py || { echo "no grpcio-tools and no tandem_proto/v1 stubs" >&2; exit 1; }
fi

echo "== gpu tests" | tee "$out/summary.txt"
set +e
timeout 280 python -m pytest -q -m gpu -p no:cacheprovider --junitxml "$out/gpu-tests.xml" \
    tests/test_gpu.py tests/test_device_clean.py tests/test_tp.py 2>&1 | tee "$out/gpu-tests.txt"
tests=${PIPESTATUS[0]}
set -e
tail -n 3 "$out/gpu-tests.txt" >> "$out/summary.txt"

echo "== benchmark" | tee -a "$out/summary.txt"
timeout 240 python bench/decode.py --device cuda --limit 1 --max-tokens 96 \
    --drafters dspark eagle3 dflash suffix --out "$out/decode.json" 2>&1 | tee "$out/bench.txt"
exit "$tests"
