#!/usr/bin/env bash
# The GPU tier in one command, for a machine with a CUDA GPU: the tests that need the GPU
# (tests/test_gpu.py: equivalence with the reference, determinism, torch.compile, CUDA graphs,
# host syncs, memory, 64-bit offsets), then the benchmark (benchmarks/bench_gpu.py).  Run from an
# environment set up as README.md says.  Everything printed also goes to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
log="$out/gpu_check_$(date +%Y%m%d-%H%M%S).log"

{
  python - <<'EOF'
import torch, dicetorch
from dicetorch import ops
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print("no CUDA device is visible: the GPU tests will be skipped and the benchmark has nothing to measure")
print("backends on CUDA tensors:", ops.available_backends("cuda"))
EOF
  echo "+ python -m pytest -ra tests/test_gpu.py"
  python -m pytest -ra tests/test_gpu.py
} 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}

echo "+ python benchmarks/bench_gpu.py" | tee -a "$log"
python benchmarks/bench_gpu.py "$@" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

echo
echo "GPU tests: exit ${tests_rc}; benchmark: exit ${bench_rc}"
echo "results: $log (this output), $out/bench_gpu_*.md and .csv (the benchmark tables)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
