#!/usr/bin/env bash
# The GPU checks of issue 7 in one run: resnet18 and baseline_cnn throughput (bf16 autocast + channels_last, fused
# Adam) against the reference loop, without and with torch.compile, then one fast-recipe resnet18 run of 10 epochs
# on 50k synthetic CIFAR-shaped images. Each step has its own time limit so the whole stays under 10 minutes.
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
step 200 python benchmarks/train_throughput.py "${quick[@]}" --device "$device" --models baseline_cnn,resnet18
step 240 python benchmarks/train_throughput.py "${quick[@]}" --device "$device" --models baseline_cnn,resnet18 --compile
step 120 python benchmarks/fast_recipe.py "${quick[@]}" --device "$device"
exit $status
