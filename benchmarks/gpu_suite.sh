#!/usr/bin/env bash
# Everything a GPU should measure, in one run of at most 8 minutes (docs/scaling.md).
#
#   benchmarks/gpu_suite.sh [--dry-run] [RESULTS.jsonl]      (make gpu-bench)
#
# Writes one JSON line per part to RESULTS.jsonl, else to $OUT/gpu_suite.jsonl when $OUT is
# set, else to ./gpu_suite.jsonl: {"part", "rc", "seconds", "cap_s", "command", "result"},
# "result" being the last JSON line the part printed (null when it printed none or ran out
# of time; rc 124 = its cap). Each part has a time cap (CAP_* below, 455 s together) and a
# log beside the results. Nothing is installed or downloaded: the built-in SmolLM2-135M, GPT-2
# with random weights, and the shared data (CHATTUNE_DATA, default ../shared/data).
#
# --dry-run: on the CPU in well under a minute, for the test suite (tests/test_gpu_suite.py):
# the device part, then every other part's exact flags checked against its script's --help
# (a renamed flag fails here, not on the day a GPU is there), then the eval part for real on
# a tiny shape (1 training step, 2 prompts of 8 tokens).
set -u -o pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
DATA="${CHATTUNE_DATA:-$ROOT/../shared/data}"
DRY=0
DEST=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $arg" >&2; exit 2 ;;
    *) DEST="$arg" ;;
  esac
done
if [ -z "$DEST" ]; then
  if [ -n "${OUT:-}" ]; then DEST="$OUT/gpu_suite.jsonl"; else DEST="$ROOT/gpu_suite.jsonl"; fi
fi
mkdir -p "$(dirname "$DEST")"
: > "$DEST"
LOGS="${DEST%.jsonl}-logs"
WORK="$(mktemp -d -t chattune-gpu-suite-XXXX)"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT

CAP_DEVICE=30 CAP_THROUGHPUT=130 CAP_METHODS=70 CAP_DECODE=90 CAP_EVAL=90 CAP_DPO=45  # 455 s

# one JSON line for a part: name, rc, seconds, cap, the command, the last JSON line of its log
record() {
  "$PY" - "$DEST" "$@" <<'PYEOF'
import json, sys
dest, part, rc, ms, cap, log, cmd = sys.argv[1:8]
result = None
for line in reversed(open(log, errors="replace").read().splitlines()):
    if line.startswith("{"):
        try:
            result = json.loads(line)
            break
        except ValueError:
            pass
with open(dest, "a") as f:
    f.write(json.dumps({"part": part, "rc": int(rc), "seconds": round(int(ms) / 1000, 1), "cap_s": int(cap),
                        "command": cmd, "result": result}) + "\n")
PYEOF
}

# part NAME CAP CMD...: run CMD (a program or an exported function) under its cap, log it,
# record it. timeout signals its whole process group: a benchmark's child processes end too.
part() {
  local name="$1" cap="$2"; shift 2
  local log="$LOGS/$name.log" start rc
  echo "[$(date +%H:%M:%S)] $name (cap ${cap}s): $*" >&2
  start=$(date +%s%N)
  timeout --kill-after=10 "$cap" bash -c '"$@"' _ "$@" > "$log" 2>&1
  rc=$?
  record "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" "$cap" "$log" "$*"
  [ "$rc" -eq 0 ] || echo "[$(date +%H:%M:%S)] $name: exit $rc (log: $log)" >&2
}

# dry run: the flags a part passes must all be flags its script declares
flags_exist() {
  local script="$1"; shift
  local help missing=""
  help="$("$PY" "$script" --help 2>&1)" || { echo "{\"error\": \"$script --help failed\"}"; return 1; }
  for a in "$@"; do
    case "$a" in --*) grep -q -- "${a%%=*}" <<< "$help" || missing="$missing ${a%%=*}" ;; esac
  done
  if [ -n "$missing" ]; then echo "{\"script\": \"$script\", \"missing_flags\": \"${missing# }\"}"; return 1; fi
  echo "{\"script\": \"$script\", \"flags_checked\": $#}"
}

export -f flags_exist
export PY
DEVICE_CHECK='
import json, sys, torch
cuda = torch.cuda.is_available()
info = {"cuda": cuda, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "bf16": torch.cuda.is_bf16_supported() if cuda else None}
print(json.dumps(info))
sys.exit(0 if cuda or "--cpu-ok" in sys.argv else 3)'

if [ "$DRY" -eq 1 ]; then
  part device "$CAP_DEVICE" "$PY" -c "$DEVICE_CHECK" --cpu-ok
else
  part device "$CAP_DEVICE" "$PY" -c "$DEVICE_CHECK"
  if [ "$(tail -1 "$DEST" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["rc"])')" != 0 ]; then
    echo "gpu_suite.sh: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU" >&2
    exit 3
  fi
fi

# training throughput against TRL (and the seed recipe): bf16, rows of ~24 conversations
# (4-8k tokens) a step, so the GPU is not waiting on launches
THROUGHPUT=(benchmarks/throughput.py --gpu --model gpt2 --model smollm2-135m --steps 8 --per-step 24 --val 16
            --gen-tokens 0 --work-dir "$WORK/throughput")
# the methods table: tokens/s and peak memory per method (each method its own process)
METHODS=(benchmarks/methods_table.py --model smollm2-135m --steps 4 --batch-size 8 --max-length 1024 --rows 200)
# decoding: the engine against HF generate at 1, 16 and 64 sequences
DECODE=(benchmarks/generation.py --device cuda --models smollm2-135m --concurrency 1,16,64 --requests 64
        --templates auto --max-new-tokens 128)
# DPO against TRL's DPOTrainer
DPO=(benchmarks/preference.py --steps 10 --batch 8 --max-length 1024 --work-dir "$WORK/dpo")

if [ "$DRY" -eq 1 ]; then
  part throughput 60 flags_exist "${THROUGHPUT[@]}"
  part methods 60 flags_exist "${METHODS[@]}"
  part decode 60 flags_exist "${DECODE[@]}"
  part dpo 60 flags_exist "${DPO[@]}"
  STEPS=1 PROMPTS=2 TOKENS=8 LENGTH=128 DATASET=sample  # the built-in sample: no tokenising of the whole set
  CAP_EVAL=300  # a CPU shared with other work: imports alone can take a minute
  MODEL="$WORK/tiny"  # a 2-layer Llama with SmolLM2's tokenizer and chat template, random weights
  "$PY" - "$MODEL" <<'PYEOF' || exit 1
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from chattune.models.loading import load_tokenizer
tok = load_tokenizer("smollm2-135m")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
PYEOF
else
  part throughput "$CAP_THROUGHPUT" "$PY" "${THROUGHPUT[@]}"
  part methods "$CAP_METHODS" "$PY" "${METHODS[@]}"
  part decode "$CAP_DECODE" "$PY" "${DECODE[@]}"
  STEPS=30 PROMPTS=100 TOKENS=512 LENGTH=512 DATASET="$DATA/arena_conversations.jsonl" MODEL=smollm2-135m
fi

# the eval of the docs/training.md LoRA recipe (a short run of it) on 100 Arena-Hard prompts:
# tuned and base answers plus the reference loss, wall time
eval_part() {
  local run="$WORK/recipe"
  "$PY" -m chattune.cli train --model "$MODEL" --method lora --dataset "$DATASET" --max-steps "$STEPS" \
      --lr 5e-4 --batch-size 4 --max-length "$LENGTH" --output-dir "$run" --set method.lora.r=16 \
      --set method.lora.alpha=32 --set "method.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]" \
      --set train.unlikelihood_alpha=1 --set train.max_eval_samples=8 || return $?
  local start
  start=$(date +%s%N)
  "$PY" -m chattune.cli eval "$run" --prompts "$DATA/arena_hard_v0.1.jsonl" --num-prompts "$PROMPTS" \
      --max-new-tokens "$TOKENS" --json > "$WORK/eval.json" || return $?
  "$PY" -c 'import json, sys; print(json.dumps({"eval_seconds": int(sys.argv[2]) / 1000, "prompts": int(sys.argv[3]),
                                                "eval": json.loads(open(sys.argv[1]).read().splitlines()[-1])}))' \
      "$WORK/eval.json" "$(( ($(date +%s%N) - start) / 1000000 ))" "$PROMPTS"
}
export -f eval_part
export DATA WORK STEPS PROMPTS TOKENS LENGTH DATASET MODEL
part eval "$CAP_EVAL" bash -c eval_part

[ "$DRY" -eq 1 ] || part dpo "$CAP_DPO" "$PY" "${DPO[@]}"

echo "[$(date +%H:%M:%S)] results: $DEST (logs: $LOGS)" >&2
"$PY" -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; sys.exit(0 if all(r["rc"] == 0 for r in rows) else 1)' "$DEST"
