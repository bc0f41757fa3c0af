#!/usr/bin/env bash
# One-GPU check of lora_sweep (issue 17), no downloads, ~7 minutes on one H200:
#   1. a ~100M-parameter random-init Llama (the embedded tokenizer), built in a temp dir;
#   2. one trial on it in bf16 autocast (train.precision=bf16; TF32 on); its self-check runs
#      first, as in every trial;
#   3. benchmarks/gpu_memory.py on that model: 20 in-process trials of one shape through one
#      cache (as a sweep worker runs them) with a real out-of-memory trial after the 10th; the
#      CUDA memory still allocated after each trial and each trial's peak, trial 1 against
#      trial 20; the OOM trial's status and reason; MFU against an 8192^3 bf16 matmul's rate;
#   4. a 20-trial default sweep on the embedded model (n_jobs=auto: one worker per visible GPU),
#      each trial's line naming its GPU and its `peak_mem_mb` (results CSV);
#   5. benchmarks/bench_trial.py, one round (it picks CUDA when torch sees one: the side-by-side
#      against the tuned HF Trainer on its ~8M model, then MFU on its ~52M model);
#   6. benchmarks/gpu_precision.py: bf16 autocast against fp32 (TF32) on 100M-750M models, the
#      figures behind train.precision=auto's size threshold on a GPU.
# Ends with a summary block; exit code 1 when a step failed.
#
#   benchmarks/gpu_check.sh               # on the GPU machine
#   benchmarks/gpu_check.sh --cpu-smoke   # a tiny version on the CPU (< 2 min on 2 cores)
# Environment: PYTHON (default .venv/bin/python), KEEP=1 keeps the temp dir, LOG_DIR: where
# each step's log goes (default: the temp dir). On a GPU machine without network whose image
# has torch but not the rest: benchmarks/device_wheels.sh (here) makes the wheels to carry.
set -euo pipefail

if [[ -n "${LOG_DIR:-}" && "$LOG_DIR" != /* ]]; then LOG_DIR="$PWD/$LOG_DIR"; fi  # relative to where it was started
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
TMP=$(mktemp -d -t lora_gpu_check.XXXXXX)
if [[ "${KEEP:-0}" == 1 ]]; then trap 'echo "kept $TMP"' EXIT; else trap 'rm -rf "$TMP"' EXIT; fi
LOGS=${LOG_DIR:-$TMP}
mkdir -p "$LOGS"
START=$(date +%s)
declare -a SUMMARY=()
FAILED=0
note() { SUMMARY+=("$1"); echo "== $1"; }
fail() { FAILED=1; note "FAILED: $1"; }

if [[ $SMOKE == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU path even on a GPU machine
  HIDDEN=64 LAYERS=2 INTER=172 HEADS=4 KV_HEADS=2
  TRIAL_ARGS=(train.max_steps=4 train.warmup_steps=1 train.batch_size=4 data.max_length=64 train.eval_every=2)
  SWEEP_TRIALS=3
  SWEEP_ARGS=(hydra.sweeper.n_jobs=1 hydra.sweeper.enqueue=null train.max_steps=4 train.warmup_steps=1
              train.batch_size=4 train.eval_every=2 train.sample_prompts=0 'data.max_length=choice(32,64)')
  STEP_TIMEOUT=120
else
  HIDDEN=768 LAYERS=16 INTER=2048 HEADS=12 KV_HEADS=4  # ~102M parameters
  TRIAL_ARGS=(train.max_steps=40 data.max_length=512)
  SWEEP_TRIALS=20
  SWEEP_ARGS=()
  STEP_TIMEOUT=180  # per step: the six took ~6.5 min on an H200 (2026-12-04); 13 min if all time out
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || echo "(no nvidia-smi)"
fi

echo "== device"
"$PY" - "$SMOKE" <<'EOF'
import sys

import torch

smoke = sys.argv[1] == "1"
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), "
          f"GPU 0 {name}, bf16 {torch.cuda.is_bf16_supported()}")
elif smoke:
    print(f"torch {torch.__version__}: CPU smoke run")
else:
    sys.exit("no CUDA device visible to torch: run with --cpu-smoke on a CPU machine")
EOF

echo "== 1. random Llama checkpoint"
MODEL="$TMP/llama"
"$PY" - "$MODEL" "$HIDDEN" "$LAYERS" "$INTER" "$HEADS" "$KV_HEADS" <<'EOF'
# bench_trial.py's model builder, larger: random init, the embedded tokenizer
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, "benchmarks")
from bench_trial import build_model_dir

out, hidden, layers, inter, heads, kv_heads = sys.argv[1], *map(int, sys.argv[2:])
build_model_dir(
    Path(out), hidden // heads, hidden=hidden, layers=layers, intermediate=inter, kv_ratio=heads // kv_heads
)
params = sum(t.numel() for t in load_file(f"{out}/model.safetensors").values())
print(f"{params / 1e6:.1f}M parameters in {out}")
EOF
PARAMS=$("$PY" -c "import json,sys; c=json.load(open(sys.argv[1]+'/config.json')); print(c['num_hidden_layers'], 'layers x', c['hidden_size'])" "$MODEL")
note "model: $PARAMS (random init, embedded tokenizer)"

echo "== 2. self-check + one trial in bf16 autocast (auto's choice by model size: step 6)"
T0=$(date +%s)
PRECISION=$([[ $SMOKE == 1 ]] && echo auto || echo bf16)
if timeout $(( STEP_TIMEOUT * 2 / 3 )) "$PY" -m lora_sweep model=local "model.path=$MODEL" "train.precision=$PRECISION" \
    "results_dir=$TMP/single" "${TRIAL_ARGS[@]}" > "$LOGS/single.log" 2>&1; then
  LINE=$("$PY" - "$TMP/single" <<'EOF'
import json
import sys
from pathlib import Path

from lora_sweep.results import read_rows, results_csv_path

row = read_rows(results_csv_path(Path(sys.argv[1]))).iloc[-1]
result = json.loads((Path(row["run_dir"]) / "result.json").read_text())
checks = ", ".join(k for k in result["self_check"] if k != "seconds")
print(
    f"status={row['status']} precision={row['precision']} device={row['device']} "
    f"peak_mem_mb={row['peak_mem_mb']} tokens_per_s={row['tokens_per_s']} "
    f"final_loss={row['final_loss']:.4f} self_check=[{checks}] in {result['self_check'].get('seconds', '?')} s"
)
EOF
)
  note "trial ($(( $(date +%s) - T0 )) s): $LINE"
  if [[ $SMOKE == 0 && $LINE != *"precision=bf16"* ]]; then fail "the trial did not train in bf16"; fi
  if [[ $LINE != *"status=success"* ]]; then fail "the trial did not succeed"; fi
else
  tail -20 "$LOGS/single.log"
  fail "single trial (log above)"
fi

echo "== 3. memory between trials, a real out-of-memory trial, MFU (benchmarks/gpu_memory.py)"
T0=$(date +%s)
MEM_ARGS=(--model "$MODEL" --json "$LOGS/memory.json")
if [[ $SMOKE == 1 ]]; then MEM_ARGS+=(--cpu-smoke); fi
if timeout "$STEP_TIMEOUT" "$PY" benchmarks/gpu_memory.py "${MEM_ARGS[@]}" > "$LOGS/memory.log" 2>&1; then
  note "memory ($(( $(date +%s) - T0 )) s): $(tail -1 "$LOGS/memory.log")"
  note "throughput: $(grep '^throughput:' "$LOGS/memory.log" | cut -d' ' -f2-)"
else
  tail -25 "$LOGS/memory.log"
  fail "gpu_memory.py (log above)"
fi

echo "== 4. $SWEEP_TRIALS-trial sweep on the embedded model"
T0=$(date +%s)
if timeout "$STEP_TIMEOUT" "$PY" -m lora_sweep -m "hydra.sweeper.n_trials=$SWEEP_TRIALS" \
    "results_dir=$TMP/sweep" "${SWEEP_ARGS[@]}" > "$LOGS/sweep.log" 2>&1; then
  grep -m1 "target: n_trials" "$LOGS/sweep.log" | sed 's/^/   /' || true
  grep -E "round-robin|GPU [0-9]+ runs" "$LOGS/sweep.log" | sed 's/^/   /' || true
  if [[ $SMOKE == 0 ]]; then
    NAMED=$(grep -cE "\] trial +[0-9]+ .*  (GPU [0-9]+|GPU-[0-9a-f]+|MIG-[0-9a-f]+)  " "$LOGS/sweep.log" || true)
    note "trial lines naming their GPU: $NAMED of $SWEEP_TRIALS"
    if [[ $NAMED != "$SWEEP_TRIALS" ]]; then fail "not every trial line names the GPU it ran on"; fi
  fi
  MEM=$("$PY" - "$TMP/sweep" <<'EOF'
import sys
from pathlib import Path

from lora_sweep.results import read_rows, results_csv_path

rows = read_rows(results_csv_path(Path(sys.argv[1]))).sort_values("trial_number")
for _, r in rows.iterrows():
    print(
        f"   trial {int(r['trial_number']) + 1:>2} {r['state']:<8} max_length={r['data.max_length']:<4} "
        f"r={r['lora.r']:<3} steps={r['steps_completed']:<3} peak_mem_mb={r['peak_mem_mb']}",
        file=sys.stderr,
    )
first, last = rows.iloc[0], rows.iloc[-1]
same = rows[(rows["data.max_length"] == first["data.max_length"]) & (rows["lora.r"] == first["lora.r"])]
like = ""
if len(same) > 1:
    like = (
        f"; same shape as trial 1 (max_length={first['data.max_length']}, r={first['lora.r']}): "
        f"trial {int(same.iloc[-1]['trial_number']) + 1} {same.iloc[-1]['peak_mem_mb']} MiB"
    )
print(
    f"{len(rows)} trials ({(rows['state'] == 'COMPLETE').sum()} complete, {(rows['state'] == 'PRUNED').sum()} "
    f"pruned, {(rows['state'] == 'FAIL').sum()} failed); peak_mem_mb trial 1 {first['peak_mem_mb']} "
    f"vs trial {int(last['trial_number']) + 1} {last['peak_mem_mb']} (max {rows['peak_mem_mb'].max()}){like}"
)
EOF
)
  note "sweep ($(( $(date +%s) - T0 )) s): $MEM"
else
  tail -20 "$LOGS/sweep.log"
  fail "sweep (log above)"
fi

echo "== 5. benchmarks/bench_trial.py"
if [[ $SMOKE == 1 ]]; then
  note "bench_trial: skipped in --cpu-smoke (its --quick alone takes 1-2 min on 2 cores)"
else
  # no --device / model-size option: it uses CUDA when available, on its own ~8M model
  if timeout 150 "$PY" benchmarks/bench_trial.py --rounds 1 --steps 22 --sweep-trials 6 > "$LOGS/bench.log" 2>&1; then
    note "bench_trial: $(tail -1 "$LOGS/bench.log")"
  else
    tail -20 "$LOGS/bench.log"
    fail "bench_trial.py (log above)"
  fi
fi

echo "== 6. bf16 autocast against fp32 (TF32) by model size (benchmarks/gpu_precision.py)"
PRECISION_ARGS=()
if [[ $SMOKE == 1 ]]; then PRECISION_ARGS+=(--cpu-smoke); fi
if timeout 150 "$PY" benchmarks/gpu_precision.py "${PRECISION_ARGS[@]}" > "$LOGS/precision.log" 2>&1; then
  while read -r line; do note "precision: $line"; done < <(grep "bf16/fp32" "$LOGS/precision.log")
else
  tail -20 "$LOGS/precision.log"
  fail "gpu_precision.py (log above)"
fi

echo
echo "================ gpu_check summary ($([[ $SMOKE == 1 ]] && echo cpu-smoke || echo gpu), $(( $(date +%s) - START )) s)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  result: $([[ $FAILED == 0 ]] && echo OK || echo FAILED)"
exit "$FAILED"
