#!/usr/bin/env bash
# The checks only a GPU can show (issues 3 and 6), prepared as ONE call of the device tool:
#
#   here:    bash scripts/device_check.sh fetch     # the pure-Python wheels the GPU image lacks -> .whl/
#   device:  run(command="bash scripts/device_check.sh run", carry=[".whl"], timeout_s=540)
#
# "run" installs the wheels into /tmp/site (the GPU image has torch but not gymnasium, SB3,
# sb3-contrib or ncps, and cannot fetch), runs the CUDA tests (RecurrentPPO and RecurrentSAC end
# to end on the GPU, save/load), and writes the GPU tables: cells against cuDNN's LSTM, and RecurrentPPO
# throughput, to $OUT (results/ when unset). DEVICE=cpu runs the same steps on the CPU, and
# "run --quick" shortens the benchmarks, to check the script itself where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2 sb3-contrib==2.9.2
        ncps==1.0.1 future==1.0.0)
case "${1:-}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
    ;;
  run)
    device=${DEVICE:-cuda}
    out=${OUT:-results}
    bench=() steps=4096
    if [[ "${2:-}" == "--quick" ]]; then bench=(--quick) steps=1024; fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda:', torch.cuda.is_available() and torch.cuda.get_device_name())"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_sb3_recurrent.py \
      tests/test_sb3_recurrent_sac.py -k cuda 2>&1 \
      | tee "$out/device_tests_$device.log"
    python3 scripts/bench_cells.py --device "$device" "${bench[@]}" --out "$out/bench_cells_$device.md" \
      | tail -32
    python3 scripts/bench_ppo_throughput.py --device "$device" --rounds 1 --steps "$steps" \
      --policies cfc lstm mlp --out "$out/ppo_throughput_$device.md" | tail -8
    ;;
  *)
    echo "usage: bash scripts/device_check.sh fetch | run [--quick]" >&2
    exit 2
    ;;
esac
