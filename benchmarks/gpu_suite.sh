#!/usr/bin/env bash
# The accelerator benchmark suite in one call: every JSON it writes goes into OUT_DIR,
# ready to commit under benchmarks/results/.
#
#   benchmarks/gpu_suite.sh OUT_DIR            # on a GPU machine (the paper's shapes)
#   benchmarks/gpu_suite.sh OUT_DIR --small    # the same steps at small shapes, on any
#                                              # device (CI runs this on the CPU)
#
# Steps: the device JAX sees (a GPU is required unless --small), the tests that check
# exact tiling on one device, then `deepcad-jax bench` workloads: reference (DeepCAD-RT's
# overlap protocol and exact tiling; float32 and bfloat16), reference-device, train-step,
# ladder, overhead (the network replaced by the identity) and a stream of 512x512 frames.
# Each step has its own time limit and log; a failing step is recorded in summary.txt
# and the suite goes on. Set PYTHON to choose the interpreter (default: python3).
set -uo pipefail

out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--small]}
small=${2:-}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak memory means the peak allocation
export PYTHONUNBUFFERED=1

if [ "$small" = "--small" ]; then
  movie=32,64,64; patch=16,32,32; stream_movie=96,64,64; ladder_patch=16,32,32
  widths=8,4; repeats=1; limit=300
  tests="tests/integration/test_exact.py::test_the_receptive_field_is_derived_and_measured_alike"
elif [ -z "$small" ]; then
  movie=300,490,490; patch=150,150,150; stream_movie=600,512,512; ladder_patch=64,128,128
  widths=64,48,32,24,16,12,8; repeats=5; tests="tests/integration/test_exact.py"; limit=150
else
  echo "error: the second argument may only be --small; got '$small'." >&2
  exit 2
fi

step() {  # step NAME LIMIT_S COMMAND...: run, log, record the outcome, go on
  local name=$1 seconds=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$summary"
}

# 1. The device. Without --small a GPU is required: a CPU run would mislabel the numbers.
"$py" - "$small" > "$out/device.json" <<'EOF'
import json, sys
import jax
devs = jax.devices()
print(json.dumps({"platform": devs[0].platform, "device_kind": devs[0].device_kind,
                  "device_count": len(devs), "jax": jax.__version__}))
if sys.argv[1] != "--small" and devs[0].platform != "gpu":
  sys.exit(f"error: JAX sees {devs[0].platform} devices, not a GPU; install the CUDA "
           "build of jax (pip install 'jax[cuda12]') or run with --small.")
EOF
rc=$?
cat "$out/device.json"
if [ $rc -ne 0 ]; then
  echo "device rc=$rc" >> "$summary"
  exit 2
fi
"$py" -c "import grain" 2>/dev/null || echo "note: grain is not importable; the train-step and ladder steps need it (pip install grain)." | tee -a "$summary"

# 2. Exactness on this device (tests that need several devices skip themselves).
if [ "$small" = "--small" ]; then platforms=cpu; else platforms=cuda; fi
step tests "$limit" env JAX_PLATFORMS=$platforms "$py" -m pytest -q -p no:cacheprovider $tests

# 3. The workloads, one process each (so each peak memory is its own).
bench() {  # bench NAME ARGS...
  local name=$1
  shift
  step "$name" "$limit" "$py" -m deepcad_jax bench --output "$out/$name.json" \
      --repeats "$repeats" --notorch "$@"
}
bench reference_fp32 --workload reference --movie $movie --patch $patch
bench reference_bf16 --workload reference --movie $movie --patch $patch --dtype bfloat16
bench reference_device_fp32 --workload reference-device --movie $movie --patch $patch
bench reference_device_bf16 --workload reference-device --movie $movie --patch $patch \
    --dtype bfloat16
bench train_step --workload train-step --patch $patch
bench ladder --workload ladder --patch $ladder_patch --widths $widths
bench overhead --workload overhead --movie $movie --patch $patch
bench stream_512 --workload stream --movie $stream_movie --dtype bfloat16

echo "== done: $(grep -c 'rc=0' "$summary") of $(grep -c 'rc=' "$summary") steps passed"
ls "$out"
