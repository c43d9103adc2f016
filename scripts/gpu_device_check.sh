#!/usr/bin/env bash
# One check of Flowcept's GPU telemetry on a machine with a real NVIDIA GPU (docs/gpu-check.md).
#
# Run from anywhere; it works in the repository root. Logs go under $OUT (default /tmp/gpu-out):
# summary.txt, env.txt, nvidia-smi.txt, pytest.log (+ pytest.xml, pytest-files.tgz), bench_telemetry.log.
# Needs python3 with numpy, h5py, psutil, click, pyyaml and nvidia-ml-py; the wheels it may lack
# (orjson, pyzmq, msgspec, built for CPython 3.12 manylinux x86_64) are taken from .whl/ if present.
# No network. Every step has a timeout; the whole script stays under 4 minutes.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/gpu-out}"
PY="${PYTHON:-python3}"
SITE=/tmp/flowcept-gpu-site   # wheels + flowcept laid out as installed
PTMP=/tmp/fgpu-pt             # pytest's basetemp: short, daemons' ipc:// paths must stay < 107 chars
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
began=$(date +%s)
BUDGET=210  # seconds for the whole script (the nvidia-smi -L/query steps add at most 20)
# limit WANT: a step's timeout, cut to what is left of BUDGET (at least 5 s)
limit() { local left=$((BUDGET - ($(date +%s) - began))); ((left < $1)) && set -- "$left"; ((${1} < 5)) && set -- 5; echo "$1"; }

# -- 1. packages: carried wheels, then flowcept from this working tree ------------------------------
rm -rf "$SITE" && mkdir -p "$SITE"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  # --target skips pip's externally-managed check and leaves the system's packages alone
  timeout "$(limit 40)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" 2>&1 | tail -5
  rc=${PIPESTATUS[0]}
  note "wheels: pip install rc=$rc (${wheels[*]})"
  if ((rc != 0)); then  # no pip (or it refused): a wheel is a zip laid out for site-packages
    timeout "$(limit 40)" "$PY" -c \
      'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "${wheels[@]}"
    note "wheels: unzipped instead, rc=$?"
  fi
else
  note "wheels: none in .whl/ (using what $PY has)"
fi
# pyproject maps daemon/ and launch/ to flowcept.daemon and flowcept.launch (package-dir): copy the
# tree in that shape instead of building (no setuptools needed, always this tree's code).
cp -r flowcept "$SITE/" && cp -r daemon "$SITE/flowcept/daemon" && cp -r launch "$SITE/flowcept/launch"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# -P: the repository root is not put on sys.path, so `flowcept` is the copy above in every process
PFLAG=$("$PY" -c 'import sys; print("-P" if sys.version_info >= (3, 11) else "")')

# -- 2. what is here ----------------------------------------------------------------------------------
{
  echo "== date: $(date -u +%FT%TZ)  host: $(hostname)  cwd: $PWD  git: $(git rev-parse --short HEAD 2>/dev/null)"
  echo "== nvidia-smi -L"; timeout 10 nvidia-smi -L 2>&1
  echo "== nvidia-smi query"
  timeout 10 nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total,memory.used,power.draw,\
temperature.gpu,utilization.gpu,persistence_mode,mig.mode.current --format=csv 2>&1
  echo "== CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}  NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES-<unset>}"
  echo "== python and packages"
  timeout "$(limit 40)" "$PY" $PFLAG - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
from importlib.metadata import version
for name in ("flowcept", "orjson", "zmq", "msgspec", "numpy", "h5py", "psutil", "pynvml", "torch", "pytest"):
    try:
        module = importlib.import_module(name)
        found = getattr(module, "__version__", None) or version("nvidia-ml-py" if name == "pynvml" else name)
        print(f"  {name:<9} {found}  {module.__file__}")
    except Exception as error:
        print(f"  {name:<9} MISSING ({type(error).__name__}: {error})")
import flowcept.daemon  # noqa: F401  (the installed layout works)
from flowcept.telemetry.nvidia import NvidiaSampler
import pynvml
s = NvidiaSampler()
try:
    nvml_version = pynvml.nvmlSystemGetNVMLVersion() if s.status == "ok" else "-"
except Exception as error:
    nvml_version = f"? ({error})"
print("NVML:", s.status, s.state.detail or "", "driver", s.state.driver_version, "NVML version", nvml_version)
for d in s.state.devices:
    print(f"  gpu {d.index}: {d.name} {d.uuid} physical {d.physical_index} mig {d.is_mig}")
for r in s.sample():
    print("  sample:", {k: v for k, v in r.items() if k != "gpu_processes"}, "processes", r["gpu_processes"])
s.close()
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", torch.cuda.device_count())
except Exception as error:
    print("torch: not usable:", error)
EOF
} > "$OUT/env.txt" 2>&1
note "env: $(grep -m1 '^NVML:' "$OUT/env.txt" || echo 'NVML line missing, see env.txt')"
timeout "$(limit 15)" nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1
note "nvidia-smi -q rc=$?"

# -- 3. tests ---------------------------------------------------------------------------------------------
# The tests of the GPU-less behaviour skip themselves here (conftest.no_real_gpu).
rm -rf "$PTMP"
timeout "$(limit 110)" "$PY" $PFLAG -m pytest -q -p no:cacheprovider -rsxXfE -rP --basetemp="$PTMP" \
  --junitxml="$OUT/pytest.xml" \
  tests/test_telemetry_gpu.py tests/test_telemetry_capture.py tests/test_hdf5_store.py tests/gpu \
  2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
note "pytest rc=$test_rc: $(tail -n 1 "$OUT/pytest.log")"
if [ -d "$PTMP" ]; then  # the tests' own files (daemon logs, JSONL, HDF5), small ones, as one archive
  (cd "$PTMP" && find . -type f -size -10M \( -name '*.log' -o -name '*.jsonl' -o -name '*.h5' \) -print0 \
     | tar --null -czf "$OUT/pytest-files.tgz" -T - 2>/dev/null)
fi

# -- 4. benchmark -------------------------------------------------------------------------------------------
timeout "$(limit 60)" "$PY" benchmarks/bench_telemetry.py 2>&1 | tee "$OUT/bench_telemetry.log"
note "bench_telemetry rc=${PIPESTATUS[0]}"

note "total $(($(date +%s) - began)) s"
exit "$test_rc"
