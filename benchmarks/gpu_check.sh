#!/usr/bin/env bash
# The GPU checks in one run: first the `gpu`-marked tests (issue 16: one epoch with amp + channels_last + compile,
# resume GPU->CPU and CPU->GPU, deterministic runs, dropout's CUDA seed, a packed trial's memory cap and cache
# release, two trials packed at gpu 0.5 through sweep.py, the auto device rule under Ray), then issue 7's
# resnet18 and baseline_cnn throughput (bf16 autocast + channels_last, fused Adam) against the reference loop,
# without and with torch.compile, then one fast-recipe resnet18 run of 10 epochs on 50k synthetic CIFAR-shaped
# images. Each step has its own time limit so the whole stays under 10 minutes (180 + 150 + 180 + 90 s).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # the same steps, tiny, on CPU (checks the script itself)
set -uo pipefail
cd "$(dirname "$0")/.."
device="${DEVICE:-cuda}"
quick=()
[[ -n "${QUICK:-}" ]] && quick=(--quick)
status=0
step() {  # step LIMIT_S CMD...: run one check, report its exit and wall time, go on with the next
  local limit=$1; shift
  echo; echo "== $* (limit ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== exit $rc after $((SECONDS - start)) s"
  [[ $rc -ne 0 ]] && status=1
  return 0
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
# -x: the first failure is the one to read; -rs lists what was skipped (every test, without CUDA)
step 180 python -m pytest -m gpu tests/test_gpu.py -x -q -rs -p no:cacheprovider
step 150 python benchmarks/train_throughput.py "${quick[@]}" --device "$device" --models baseline_cnn,resnet18
step 180 python benchmarks/train_throughput.py "${quick[@]}" --device "$device" --models baseline_cnn,resnet18 --compile
step 90 python benchmarks/fast_recipe.py "${quick[@]}" --device "$device"
exit $status
