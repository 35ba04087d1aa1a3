#!/usr/bin/env bash
# The GPU acceptance run in one command:
#
#   scripts/gpu_check.sh [OUT_DIR]        # default outputs/gpu_check/
#
# 1. the GPU tests (pytest -m gpu)
# 2. a 1-GPU strategy=ddp run (NCCL process group)
# 3. bf16-mixed runs of scratch, torch and fused (short)
# 4. scripts/bench.py --device cuda, and scripts/bench_framework.py at B32 H256 (through Lightning vs the bare step)
#    and scripts/bench_graphs.py (every variant at B32 H256 and B128 H512: K=1 eager against K=16 as a CUDA graph)
#    and scripts/bench_stack.py --stack-of 16 (one job alone against 16 stacked trials at B32 H256: trials per hour)
# 5. a 2-job hydra/launcher=local sweep on the GPU(s), each job on its own GPU when there are 2 or more
#
# Writes OUT_DIR/gpu_check_<UTC date-time>.md (device, versions, each step's status and key numbers) and the
# steps' logs and outputs beside it in OUT_DIR/gpu_check_<UTC date-time>/. Exit status 0 only if every step passed.
# Without a CUDA device it says so and exits 1, writing nothing. If a `.whl/` folder of wheels is in the repository
# (a GPU machine without hydra-core, omegaconf, wandb, ...; see docs/multi-gpu.md), they are installed into
# /tmp/site first and put on PYTHONPATH. The corpus is found as gruexp finds it ($GRUEXP_DATA_DIR, the user cache).
# PYTHON=... picks the interpreter (default python3).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
OUT_ROOT=${1:-outputs/gpu_check}
EPOCHS=${GPU_CHECK_EPOCHS:-2}

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch: nothing can be checked (set PYTHON=<interpreter with torch>)" >&2
  exit 1
fi
cuda=yes
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || cuda=no

if [ $cuda = yes ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || {
    echo "gpu_check: installing .whl/ failed" >&2
    exit 1
  }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" # this checkout's gruexp, installed or not
export WANDB_MODE=offline HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1

missing=$("$PY" -c '
import importlib.util as u
print(" ".join(m for m in ("hydra", "omegaconf", "wandb", "submitit", "lightning", "torchmetrics", "pytest", "matplotlib") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (fill .whl/ as docs/multi-gpu.md says)" >&2
  exit 1
fi
if ! corpus=$("$PY" -c 'from gruexp.data import CORPORA, resolve; print(resolve(CORPORA["timemachine"], False))' 2>&1); then
  echo "gpu_check: no corpus: ${corpus##*$'\n'}" >&2
  exit 1
fi
# Last of the checks, so that a CPU machine runs all of the above (tests/test_gpu_check.py)
if [ $cuda = no ]; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch $("$PY" -c 'import torch; print(torch.__version__)')): nothing GPU-side was checked" >&2
  exit 1
fi

STAMP=$(date -u +%Y-%m-%d_%H-%M-%S)
OUT_ROOT=$(mkdir -p "$OUT_ROOT" && cd "$OUT_ROOT" && pwd)
WORK="$OUT_ROOT/gpu_check_$STAMP"
REPORT="$OUT_ROOT/gpu_check_$STAMP.md"
mkdir -p "$WORK"
declare -a ROWS=()
FAILED=0

# record STEP STATUS NUMBERS LOG: one row of the report's table
record() {
  ROWS+=("| $1 | $2 | $3 | ${4#"$OUT_ROOT"/} |")
  [ "$2" = pass ] || FAILED=1
  echo "gpu_check: $1: $2 $3" >&2
}

# numbers RUN_DIR: status, val/ppl and tokens/sec from a run's summary.json
numbers() {
  "$PY" scripts/gpu_check_numbers.py run "$1"
}

# run_train NAME OVERRIDES...: a short single run in $WORK/NAME; passes if it exits 0 and its summary says completed
run_train() {
  local name=$1 dir="$WORK/$1"
  shift
  "$PY" -m gruexp.train trainer.max_epochs="$EPOCHS" logger=csv trainer.enable_progress_bar=false \
    "hydra.run.dir=$dir" "$@" >"$WORK/$name.log" 2>&1
  local rc=$? nums
  nums=$(numbers "$dir")
  if [ $rc -eq 0 ] && [[ $nums == completed:* ]]; then
    echo "pass|$nums"
  else
    echo "FAIL|exit $rc, $nums"
  fi
}

# 1. GPU tests
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests >"$WORK/pytest_gpu.log" 2>&1
rc=$?
last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$WORK/pytest_gpu.log" | tail -n 1 | tr -d '=' | xargs)
if [ $rc -eq 0 ] && [[ $last =~ [0-9]+\ passed ]]; then status=pass; else status=FAIL; fi # all skipped: no GPU used
record "pytest -m gpu" "$status" "${last:-exit $rc}" "$WORK/pytest_gpu.log"

# 2. one-GPU DDP: Lightning's DDP over NCCL with a world of 1
IFS='|' read -r status nums < <(run_train ddp_1gpu model=fused trainer=ddp trainer.accelerator=gpu trainer.devices=1)
backend=$(grep -ho 'distributed_backend=[a-z]*' "$WORK/ddp_1gpu.log" "$WORK/ddp_1gpu"/*.log 2>/dev/null | head -n 1 | cut -d= -f2)
if [ "$status" = pass ] && [ -z "$backend" ]; then
  # Lightning prints the backend at INFO; if its console was quieted, check NCCL with torch.distributed directly
  backend=$("$PY" - <<'EOF' 2>>"$WORK/ddp_1gpu.log"
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
dist.init_process_group("nccl", rank=0, world_size=1)
t = torch.ones(1, device="cuda")
dist.all_reduce(t)
print(dist.get_backend() if t.item() == 1 else "all_reduce-wrong")
dist.destroy_process_group()
EOF
  )
  nums="$nums; backend from a direct NCCL all_reduce: ${backend:-failed}"
  [ "$backend" = nccl ] || status=FAIL
else
  nums="$nums; backend ${backend:-not found in the log}"
  [ "$backend" = nccl ] || status=FAIL
fi
record "1-GPU strategy=ddp (NCCL)" "$status" "$nums" "$WORK/ddp_1gpu.log"

# 3. bf16-mixed, every variant (++: works whether or not conf/trainer already has a `precision` key)
for model in scratch torch fused; do
  IFS='|' read -r status nums < <(run_train "bf16_$model" "model=$model" trainer=gpu ++trainer.precision=bf16-mixed)
  record "bf16-mixed model=$model" "$status" "$nums" "$WORK/bf16_$model.log"
done

# 4. the benchmark on CUDA
"$PY" scripts/bench.py --device cuda --json "$WORK/bench-gpu.json" >"$WORK/bench.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ -s "$WORK/bench-gpu.json" ]; then
  nums=$("$PY" scripts/gpu_check_numbers.py bench "$WORK/bench-gpu.json")
  record "bench.py --device cuda" pass "$nums" "$WORK/bench.log"
else
  record "bench.py --device cuda" FAIL "exit $rc" "$WORK/bench.log"
fi

# 4b. the training step through Lightning's loop against the bare step, and Lightning's floor
"$PY" scripts/bench_framework.py --device cuda --shapes 32x256 --variants fused,torch \
  --json "$WORK/bench-framework.json" >"$WORK/bench-framework.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && nums=$("$PY" scripts/gpu_check_numbers.py framework "$WORK/bench-framework.json"); then
  record "bench_framework.py --device cuda" pass "$nums" "$WORK/bench-framework.log"
else
  record "bench_framework.py --device cuda" FAIL "exit $rc" "$WORK/bench-framework.log"
fi

# 4c. CUDA graphs: each variant trained at B32 H256 and B128 H512 with K=1 eager and with K=16 captured as a graph,
# tokens/s, MFU and graph/eager against the issue's targets (12 short runs; fails if a run failed or fell back)
"$PY" scripts/bench_graphs.py --device cuda --shapes 32x256,128x512 --variants scratch,torch,fused \
  --runs-dir "$WORK/graphs" --json "$WORK/bench-graphs.json" >"$WORK/bench-graphs.log" 2>&1
rc=$?
if [ -s "$WORK/bench-graphs.json" ] && nums=$("$PY" scripts/gpu_check_numbers.py graphs "$WORK/bench-graphs.json"); then
  [ $rc -eq 0 ] && status=pass || status=FAIL
  record "bench_graphs.py --device cuda" "$status" "exit $rc; $nums" "$WORK/bench-graphs.log"
else
  record "bench_graphs.py --device cuda" FAIL "exit $rc" "$WORK/bench-graphs.log"
fi

# 4d. stacked trials: one job alone against a stack of 16 (seed=1..16) at B32 H256, trials per hour (issue 24: >= 8x)
"$PY" scripts/bench_stack.py --stack-of 16 --hidden-sizes 256 --trainer gpu --epochs 10 \
  --json "$WORK/bench-stack.json" >"$WORK/bench-stack.log" 2>&1
rc=$?
nums=$(grep -o '[0-9.]*x the trials per hour' "$WORK/bench-stack.log")
[ $rc -eq 0 ] && [ -n "$nums" ] && status=pass || status=FAIL
record "bench_stack.py --stack-of 16 (GPU)" "$status" "exit $rc; ${nums:-no ratio}" "$WORK/bench-stack.log"

# 5. two jobs side by side under hydra/launcher=local: each its own GPU when the machine has 2 or more
"$PY" -m gruexp.train -m hydra/launcher=local hydra.launcher.array_parallelism=2 trainer=gpu model=fused \
  optimizer.lr=0.5,1 trainer.max_epochs="$EPOCHS" logger=csv trainer.enable_progress_bar=false \
  "hydra.sweep.dir=$WORK/sweep" >"$WORK/sweep.log" 2>&1
rc=$?
devices=$(grep -ho 'CUDA_VISIBLE_DEVICES=[^ ]*' "$WORK"/sweep/*/train.log 2>/dev/null | sort | tr '\n' ' ')
done_jobs=$(grep -l '"status": "completed"' "$WORK"/sweep/*/summary.json 2>/dev/null | wc -l)
if [ $rc -eq 0 ] && [ "$done_jobs" -eq 2 ]; then status=pass; else status=FAIL; fi
record "local sweep, 2 jobs" "$status" "exit $rc, $done_jobs/2 completed; ${devices:-no device line}" "$WORK/sweep.log"

{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"- device: {torch.cuda.device_count()} x {', '.join(sorted(set(names)))} (torch.cuda.get_device_name)")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"lightning {version('lightning')}, torchmetrics {version('torchmetrics')}, "
      f"hydra-core {version('hydra-core')}, Python {platform.python_version()}")
print(f"- bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
  if command -v nvidia-smi >/dev/null; then
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd ';')"
  fi
  echo "- host $(hostname), commit $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown) (-dirty: with changes not committed), $EPOCHS epochs per run"
  echo
  echo "| step | status | key numbers | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} >"$REPORT"

echo "gpu_check: report $REPORT" >&2
cat "$REPORT"
exit $FAILED
