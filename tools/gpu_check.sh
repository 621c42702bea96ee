#!/usr/bin/env bash
# The GPU check in one command (`make gpu-check OUT=DIR`, or `bash tools/gpu_check.sh DIR`):
# on a bare GPU machine with no network, whose python3 has a CUDA build of torch (2.11+),
# Triton (3.6+), pytest and cmake but none of our pins. About 8 minutes on one H100/H200.
#   1. builds the extension for the local GPU only (BK_CUDA_ARCHS=native);
#   2. runs the C++ CUDA tests (ctest: norms with and without tensor cores, the other ops);
#   3. runs bench/gpu.py: measured ceilings, each kernel's fraction of its roofline, GPT-2 124M
#      private step against non-private;
#   4. runs every test with a cuda or triton parametrization (ops, engine, models on CUDA;
#      pytest-xdist spreads them over the cores when it is installed), with what time is left;
#   5. if time is left, profiles the GPT-2 step (bench/gpu_profile.py; not a pass/fail stage).
# The whole check keeps within GPU_CHECK_SECONDS (default 480): a stage gets at most what is
# left, and pytest is stopped with SIGINT, so it still prints its summary and writes the XML.
# Writes DIR/gpu_check.log (everything), DIR/gpu_check.json (the summary), DIR/gpu_bench.json,
# DIR/pytest.xml, DIR/ctest.log, DIR/ctest_build.log, DIR/gpu_profile.txt and .json: 8 files, as
# many as the workplace's device tool brings back. Every stage runs even when one before it
# fails; the exit status says whether all passed (the profile aside).
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
declare -A status

deadline=$(( start + ${GPU_CHECK_SECONDS:-480} ))

stage() {  # stage NAME TIMEOUT_S COMMAND...: runs it (within the deadline), records rc and seconds
  local name=$1 limit=$2
  shift 2
  local left=$(( deadline - $(date +%s) - 10 ))
  (( left < limit )) && limit=$left
  (( limit < 5 )) && { status[$name]="rc=skipped (no time left)"; echo "=== $name: no time left ==="; return; }
  local t0=$(date +%s)
  echo "=== $name (limit ${limit} s) ==="
  timeout -s INT -k 15 "$limit" bash -c '"$@"' "$name" "$@"  # bash -c: a stage may be a function
  local rc=$?
  status[$name]="rc=$rc seconds=$(( $(date +%s) - t0 ))"
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 )) s ==="
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
CAP=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")

# 1. Build: the editable install (as the README), or in place when this machine's setuptools
#    cannot read our pyproject metadata.
export BK_GPU_CHECK=1 BK_CUDA=1 BK_CUDA_ARCHS=native MAX_JOBS=${MAX_JOBS:-16}
build() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . || "$PY" setup.py build_ext --inplace
}
export -f build
export PY
# The standalone C++ tests need no torch: their CMake build runs beside the extension's.
cmake_tests() {
  cmake -S . -B build/gpu-cmake -DCMAKE_BUILD_TYPE=Release -DBK_CUDA_ARCHS="$CAP" &&
    cmake --build build/gpu-cmake -j 4
}
cmake_tests >"$OUT/ctest_build.log" 2>&1 &
ctest_build=$!
stage build 300 build
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import bk_kernels as bk; print(bk.build_info())"

# 2. C++ CUDA tests (the standalone CMake build of csrc/, for this GPU's architecture).
wait $ctest_build
ctest_build_rc=$?
tail -5 "$OUT/ctest_build.log"
if (( ctest_build_rc == 0 )); then
  stage ctest 240 ctest --test-dir build/gpu-cmake --output-on-failure --output-log "$OUT/ctest.log"
else
  status[ctest]="rc=$ctest_build_rc (the CMake build failed: ctest_build.log)"
fi

# 3. The GPU bench.
stage bench 180 "$PY" bench/gpu.py --out "$OUT"

# 4. pytest: what only a GPU runs (the cpu and torch cases ran in CI already; so did the
#    Triton ahead-of-time compiles, which need no GPU).
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-12}")
stage pytest 600 "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" --junitxml="$OUT/pytest.xml" -rfE \
  python_tests --ignore=python_tests/ops/test_triton_aot.py -k "cuda or triton or gpu or second or bitwise or device"

# 5. Where the GPT-2 step's time goes (torch.profiler), with what time is left: not a pass/fail stage.
left=$(( deadline - $(date +%s) - 10 ))
if (( left > 30 )); then
  echo "=== profile (limit $left s) ==="
  timeout -s INT "$left" "$PY" bench/gpu_profile.py --out "$OUT" > "$OUT/gpu_profile.txt" 2>&1
  echo "=== profile: rc=$? (gpu_profile.txt, gpu_profile.json) ==="
fi

"$PY" - "$OUT" "$(( $(date +%s) - start ))" "${status[build]:-}" "${status[ctest]:-}" "${status[bench]:-}" \
  "${status[pytest]:-}" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
out, seconds, *stages = sys.argv[1:]
summary = {"seconds": int(seconds), "stages": dict(zip(["build", "ctest", "bench", "pytest"], stages))}
try:
    import torch
    summary["device"] = torch.cuda.get_device_name()
    summary["torch"] = torch.__version__
except Exception as err:
    summary["device"] = f"unknown ({err})"
xml = os.path.join(out, "pytest.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suite = root.find("testsuite") if root.find("testsuite") is not None else root
    summary["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = os.path.join(out, "gpu_bench.json")
if os.path.exists(bench):
    report = json.load(open(bench))
    summary["gpt2"] = [{k: r.get(k) for k in ("method", "ms", "ratio", "error")} for r in report["gpt2"]["rows"]]
    summary["kernels"] = [{k: r.get(k) for k in ("op", "dtype", "backend", "ms", "fraction", "bound", "error")}
                          for r in report["kernels"]]
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps({k: summary.get(k) for k in ("device", "seconds", "stages", "pytest")}, indent=1))
PY

failed=0
for s in build ctest bench pytest; do
  case "${status[$s]:-rc=missing}" in rc=0*) ;; *) failed=1 ;; esac
done
echo "gpu check: $([ $failed = 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - start )) s; report in $OUT"
exit $failed
