#!/usr/bin/env bash
# `preserve-onnx calibrate` on a lent GPU (docs/calibrate.md), prepared for the `device` tool: run from the
# repository root there, writes under $OUT (the tool's output folder; ./build/gpu when unset):
#   calibrate.log        everything printed (environment, the measurement's progress, the tables' source)
#   calibrate.json       every measured figure and comparison row (`calibrate --json`)
#   NAME-calibrated.toml the calibrated profile (`--hardware` loads it)
# Budget: the calibration itself takes about a minute on an H100; it is stopped after 8 minutes.
#
# What it needs there: python3 with CuPy, onnx, numpy, typer and rich (the GPU image's python3 has them:
# .library/device/KINDS.md). The package is not installed (pip would build the CPU runtime library, which
# needs onnxruntime's headers from the network): its sources are copied to a folder on PYTHONPATH, with
# passes/ placed at preserve_onnx/passes as the wheel places it.
set -uo pipefail
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/calibrate.log"
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }

say "== $(date -u +%Y-%m-%dT%H:%M:%SZ) bench/gpu/check.sh in $(pwd)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"

PY=${PYTHON:-python3}
missing=$("$PY" - <<'EOF' 2>&1
import importlib
gone = []
for name in ("cupy", "onnx", "numpy", "typer", "rich"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        gone.append(f"{name} ({type(exc).__name__}: {exc})")
print("; ".join(gone))
EOF
)
if [ -n "$missing" ]; then
    say "check.sh: $PY lacks: $missing (carry wheels: .library/device/README.md, Notes)"
    exit 1
fi
"$PY" -c 'import sys, cupy, onnx, typer, rich; print("python", sys.version.split()[0], "cupy", cupy.__version__,
"onnx", onnx.__version__, "typer", typer.__version__)' 2>&1 | tee -a "$LOG"

SITE=$(mktemp -d /tmp/preserve-onnx.XXXXXX)
cp -r preserve_onnx "$SITE/preserve_onnx"
rm -rf "$SITE/preserve_onnx/passes"
cp -r passes "$SITE/preserve_onnx/passes"
# PRESERVE_DEBUG: an error inside the measurement (CuPy, NVRTC, the driver) prints its traceback here.
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PRESERVE_DEBUG=1
cd "$SITE"  # python puts the current folder first on sys.path: the repository's preserve_onnx lacks passes/
"$PY" -c 'import preserve_onnx.calibrate as c; print("preserve_onnx from", c.__file__)' 2>&1 | tee -a "$LOG"

NAME=${NAME:-}  # empty: the profile the GPU's name matches (h100-sxm, h200)
ARGS=(calibrate --device "${DEVICE:-cuda:0}" --json)
[ -n "$NAME" ] && ARGS+=(--name "$NAME")
# The profile's name is known once the GPU is: write into a folder, then move it beside the log.
mkdir -p "$SITE/out"
ARGS+=(--out "$SITE/out/calibrated.toml")
say "== $PY -m preserve_onnx ${ARGS[*]}"
timeout 480 "$PY" -m preserve_onnx "${ARGS[@]}" >"$OUT/calibrate.json" 2> >(tee -a "$LOG" >&2)
rc=$?
if [ $rc -ne 0 ]; then
    say "check.sh: calibrate exited $rc$([ $rc -eq 124 ] && echo ' (stopped after 8 minutes)')"
    exit $rc
fi
profile=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["profile"])' "$OUT/calibrate.json")
cp "$SITE/out/calibrated.toml" "$OUT/$profile-calibrated.toml"
cat "$OUT/$profile-calibrated.toml" >>"$LOG"

# The comparison, short, last: the tool's reply carries the end of the output.
"$PY" - "$OUT/calibrate.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['provenance']['device']}, driver {d['provenance']['driver']}, {d['prefetch_instruction']}")
for f, v in d["figures"].items():
    print(f"  {f}: measured {v['measured']:.6g}, published {v['published']:.6g}")
t = d["max_tokens"]
print(f"  max_tokens (fp16 {t['k']}x{t['n']}): measured {t['measured']} (swept to {t['swept_to']}), "
      f"predicted {t['predicted']:.0f}{' !' if t['flagged'] else ''}")
print("tokens weight_MiB alpha_us base_us saved_us +-us model_saved_us ratio flag")
for r in d["comparison"]:
    ratio = "-" if r["difference"] is None else f"{r['difference'] + 1:.2f}"
    print(f"{r['tokens']} {r['weight_bytes'] / 2**20:.0f} {r['alpha_s'] * 1e6:.2f} {r['measured_baseline_s'] * 1e6:.2f} "
          f"{r['measured_saving_s'] * 1e6:.3f} {r['noise_s'] * 1e6:.3f} {r['predicted_saving_s'] * 1e6:.3f} {ratio} "
          f"{'!' if r['flagged'] else ''}")
print(f"{sum(r['flagged'] for r in d['comparison'])} of {len(d['comparison'])} cases flagged")
EOF
say "== done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
