#!/usr/bin/env bash
# The GPU check, one command on the GPU box (docs/TRAINING.md, "Proving the GPU path"):
#
#   bash benchmarks/gpu/run.sh "$OUT"                   # on the box: gpu-125m on the GPU (carry .gpu-kit)
#   bash benchmarks/gpu/run.sh --profile tiny OUT       # the same steps on the CPU (the rehearsal)
#   bash benchmarks/gpu/run.sh --profile tiny --no-kit OUT   # ... with the packages already installed
#
# Installs the kit (.gpu-kit/, `make gpu-kit`) into a temporary folder placed first on PYTHONPATH, so its
# transformers 4.x, tokenizers and huggingface_hub shadow the box's newer ones; installs the project itself
# there too (the `ownllm` sub-commands are entry points); then runs benchmarks/gpu/check.py, which writes
# OUT/results.json and the logs. Anything after the options and OUT goes to check.py (e.g. --steps 300).
# Fails fast, before any training, with one line saying what is missing.
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu/run.sh [--profile gpu|tiny] [--no-kit] [--kit DIR] OUT [check.py options]" >&2; exit 2; }
die() { echo "gpu-check: $*" >&2; exit 3; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROFILE="${OWNLLM_GPU_CHECK_PROFILE:-gpu}"
KIT="$REPO/.gpu-kit"
USE_KIT=1
PY="${PYTHON:-python3}"
NVIDIA_SMI="${NVIDIA_SMI:-nvidia-smi}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) [[ $# -ge 2 ]] || usage; PROFILE="$2"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --no-kit) USE_KIT=0; shift ;;
    --kit) [[ $# -ge 2 ]] || usage; KIT="$2"; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "gpu-check: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
OUT="$1"; shift
case "$PROFILE" in gpu|tiny) ;; *) echo "gpu-check: unknown profile '$PROFILE' (gpu or tiny)" >&2; usage ;; esac

command -v "$PY" >/dev/null || die "no Python ($PY) on the PATH"
mkdir -p "$OUT" 2>/dev/null && [[ -w "$OUT" ]] || die "cannot write to OUT=$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
: >"$OUT/check.log"; rm -f "$OUT/results.json"

if [[ "$PROFILE" == gpu ]]; then
  command -v "$NVIDIA_SMI" >/dev/null || die "nvidia-smi not found: the gpu profile needs an NVIDIA GPU (use --profile tiny on a CPU)"
  "$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$OUT/check.log" 2>&1 \
    || die "nvidia-smi failed: $(tail -1 "$OUT/check.log")"
fi

if [[ "$USE_KIT" == 1 ]]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || die "the kit is built for CPython 3.12; $PY is $("$PY" -c 'import platform; print(platform.python_version())')"
  "$PY" "$REPO/benchmarks/gpu/kit.py" check --kit "$KIT" >>"$OUT/check.log" 2>&1 \
    || die "$(tail -n +1 "$OUT/check.log" | grep -v '^ ' | tail -3 | tr '\n' ' ')"
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/ownllm-gpu-site.XXXXXX")"
  trap 'rm -rf "$SITE"' EXIT
  # The project itself goes in too, so the `ownllm.commands` entry points exist; built from a copy of this
  # tree with the box's own setuptools. --no-deps --no-index: the box has no network, everything else comes
  # from its site-packages. --no-compile: Python compiles only what it imports (pip would compile it all).
  BUILD="$SITE.project"
  mkdir -p "$BUILD" && cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/pipeline" "$REPO/feedback" "$REPO/rlhf" "$BUILD/"
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --disable-pip-version-check \
    --target "$SITE" "$KIT"/*.whl "$BUILD" >>"$OUT/check.log" 2>&1 \
    || die "pip could not install the kit and the project (see $OUT/check.log)"
  rm -rf "$BUILD"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "kit installed into $SITE in $(( $(date +%s) - START )) s" >>"$OUT/check.log"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the installed ownllm's entry points, this tree's code
fi
export PYTHONNOUSERSITE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OWNLLM_WANDB_MODE=disabled \
  WANDB_SILENT=true
"$PY" - <<'EOF' >>"$OUT/check.log" 2>&1 || die "the training stack does not import (see $OUT/check.log)"
import importlib.metadata as md, sys
import torch, composer, streaming, transformers, pydantic, pipeline.cli  # noqa: F401
print("python", sys.version.split()[0], {d: md.version(d) for d in ("torch", "mosaicml", "mosaicml-streaming",
      "transformers", "tokenizers", "huggingface_hub", "numpy", "pydantic")}, "cuda", torch.cuda.is_available())
EOF
if [[ "$PROFILE" == gpu ]]; then
  "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' || die "torch sees no CUDA device"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ownllm-gpu-check.XXXXXX")"
set +e
"$PY" "$REPO/benchmarks/gpu/check.py" "$OUT" --profile "$PROFILE" --work "$WORK" "$@"
RC=$?
set -e
rm -rf "$WORK"
echo "gpu-check: exit $RC after $(( $(date +%s) - START )) s; results in $OUT/results.json" | tee -a "$OUT/check.log"
exit $RC
