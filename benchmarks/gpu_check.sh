#!/usr/bin/env bash
# The GPU check (issue 17): on a CUDA machine, a few steps of each GPU path, with throughput and peak GPU memory.
#
#   bash benchmarks/gpu_check.sh [OUT]          (OUT defaults to runs/gpu-check; needs `make install` first)
#
#   1. environment: torch, CUDA, GPU count, bf16 support, one NCCL all-reduce over every GPU
#   2. the quickstart-fast recipe on one GPU (SFT -> labels -> RM -> PPO -> eval), wall time per stage
#   3. SFT under FSDP2 on every GPU (accelerate launch, src/tether/launch/fsdp2.yaml), 20 steps: tokens/s, peak memory
#   4. DDP PPO on every GPU (torchrun), 3 iterations, the task's gold as the reward
#   5. PPO with the vLLM rollout engine (if vLLM is installed), 3 iterations: the engine/trainer log-prob gap
# Each part prints one summary line; a part that fails says so and the next one runs.
set -u
OUT=${1:-runs/gpu-check}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "gpu_check: no CUDA GPU here"; exit 1; }
MODEL=builtin:smollm2-135m-instruct

summary() {  # summary NAME RUN_FOLDER: steps, tokens/s (median of the logged steps), peak GPU memory, wall time
  $PY - "$1" "$2" <<'PY'
import json, statistics, sys
name, out = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(f"{out}/summary.json"))
except OSError:
    print(f"{name}: FAILED (no summary.json; see {out}.log)"); sys.exit(0)
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
tps = [r[k] for r in rows for k in ("train/tokens_per_s", "throughput/tokens_per_s") if k in r]
print(f"{name}: {s.get('steps')} steps, {statistics.median(tps) if tps else float('nan'):.0f} tokens/s (median), "
      f"peak GPU memory {s.get('peak_memory_mb', float('nan')) / 1024:.2f} GiB (rank 0), wall {s.get('wall_time_s')} s"
      + (f", world size {s['world_size']}" if "world_size" in s else "")
      + "".join(f", {k} {s[k]:.4f}" for k in ("rollout/engine_logp_gap", "rollout/engine_kl") if k in s))
PY
}

echo "== 1. environment"
$PY -c "import tether.envinfo as e; print(e.env_report())"
$PY - <<'PY'
import torch
print("bf16 supported:", torch.cuda.is_bf16_supported(), "| GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); torch.cuda.synchronize()
import time; t = time.time(); [a @ a for _ in range(20)]; torch.cuda.synchronize()
print(f"bf16 matmul: {20 * 2 * 8192**3 / (time.time() - t) / 1e12:.0f} TFLOP/s")
PY
cat > "$OUT/allreduce.py" <<'PY'
import os, torch, torch.distributed as dist
dist.init_process_group("nccl"); r = dist.get_rank(); torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.full((4,), float(r + 1), device="cuda"); dist.all_reduce(x)
if r == 0: print("NCCL all-reduce over", dist.get_world_size(), "GPUs:", x.tolist())
dist.destroy_process_group()
PY
$PY -m torch.distributed.run --nproc_per_node "$NGPU" "$OUT/allreduce.py" 2>&1 | grep -v "^W" | tail -2

echo "== 2. quickstart-fast on one GPU"
t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 $PY -m tether run src/tether/recipes/quickstart-fast.yaml --out "$OUT/quickstart-fast" --force --no-report \
  > "$OUT/quickstart-fast.log" 2>&1 && echo "quickstart-fast: done in $(( $(date +%s) - t0 )) s" || echo "quickstart-fast: FAILED (see $OUT/quickstart-fast.log)"
for s in sft rm ppo; do summary "  $s" "$OUT/quickstart-fast/$s"; done

echo "== 3. SFT under FSDP2 on $NGPU GPU(s)"
BS=$(( 8 * NGPU ))
$PY -m accelerate.commands.launch --config_file src/tether/launch/fsdp2.yaml --num_processes "$NGPU" -m tether sft \
  --model $MODEL --data builtin:demos --out "$OUT/fsdp2-sft" --set train.max_steps=20 --set train.batch_size=$BS \
  --set train.save_every=10 --set train.overwrite=true --set train.report_to=none > "$OUT/fsdp2-sft.log" 2>&1
summary "fsdp2 sft" "$OUT/fsdp2-sft"
$PY -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$OUT/fsdp2-sft/model'); print('fsdp2 sft: OUT/model loads as one Hugging Face folder')" 2>&1 | tail -1

echo "== 4. DDP PPO on $NGPU GPU(s)"
$PY -m torch.distributed.run --nproc_per_node "$NGPU" -m tether ppo --model $MODEL --out "$OUT/ddp-ppo" \
  --set reward.gold_weight=1 --set train.max_steps=3 --set rollout.prompts_per_step=$(( 8 * NGPU )) \
  --set ppo.minibatch_size=$(( 4 * NGPU )) --set model.lora_r=16 --set train.overwrite=true --set train.report_to=none \
  > "$OUT/ddp-ppo.log" 2>&1
summary "ddp ppo" "$OUT/ddp-ppo"

echo "== 5. PPO with the vLLM engine"
if $PY -c "import vllm" 2>/dev/null; then
  $PY -m torch.distributed.run --nproc_per_node "$NGPU" -m tether ppo --model $MODEL --out "$OUT/vllm-ppo" \
    --set rollout.engine=vllm --set reward.gold_weight=1 --set train.max_steps=3 --set rollout.prompts_per_step=$(( 8 * NGPU )) \
    --set ppo.minibatch_size=$(( 4 * NGPU )) --set model.lora_r=16 --set train.overwrite=true --set train.report_to=none \
    > "$OUT/vllm-ppo.log" 2>&1
  summary "vllm ppo" "$OUT/vllm-ppo"
else
  echo "vllm ppo: skipped (vLLM is not installed: pip install \"tether-rlhf[vllm]\")"
fi
