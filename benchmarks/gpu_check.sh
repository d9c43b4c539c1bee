#!/usr/bin/env bash
# One prepared GPU check on a single H200: bf16, random-initialised weights, no downloads. The steps' limits
# sum to 555 s, under the 600 s a device command may run (tests/test_benchmarks_gpu_check.py keeps it so).
#   1. layer_speed at full shapes (d=4096, r=16, E=16, 2048 tokens; scalar and FGR) on CUDA
#   2. train_step on a LLaMA-2-7B-shaped model (32 layers): lora, hydralora (q,v), block-FFN+FGR, full mtLoRA
#   3. eval throughput (MMLU harness protocol on the bundled tiny model, GPU path)
#   4. QLoRA memory: peak of a training step on a 16-bit vs 8-bit vs 4-bit base (LLaMA-2-7B shapes, 8 of the
#      32 layers, full 32k vocabulary; needs bitsandbytes: pip install -e '.[qlora]')
#   5. vLLM multi-LoRA serving of `mtlora export` component exports (two task LoRAs in one batch vs plain peft),
#      only if vllm is installed, and only in the time steps 1-4 left of the 560 s budget (its timeout is
#      what remains, so the total stays within the fixed limits above)
# Results land in benchmarks/results/*.json (and $OUT when run through the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d src ] && ! $PY -c "import mtlora" 2>/dev/null; then export PYTHONPATH=$PWD/src:${PYTHONPATH:-}; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

echo "== layer_speed (cuda, bf16)"
timeout 120 $PY benchmarks/layer_speed.py --device cuda --dtype bfloat16 --out "$OUTDIR/layer_speed_cuda.json" || echo "layer_speed failed: $?"

echo "== train_step (LLaMA-2-7B shape, 32 layers, bf16, 2 x 1024 tokens)"
timeout 210 $PY benchmarks/train_step.py --device cuda --dtype bfloat16 --layers 32 --batch 2 --tokens 1024 \
  --vocab 32000 --repeats 5 --methods lora,hydralora,block_ffn_fgr,mtlora_full \
  --out "$OUTDIR/train_step_cuda.json" || echo "train_step failed: $?"

echo "== eval throughput (cuda)"
if [ -f benchmarks/eval_speed.py ]; then
  timeout 75 $PY benchmarks/eval_speed.py --device cuda --json "$OUTDIR/eval_speed_cuda.json" || echo "eval_speed failed: $?"
fi
echo "== qlora memory (cuda, bf16 compute; 16 vs 8 vs 4-bit base, 8 LLaMA-2-7B layers, 1 x 1024 tokens)"
timeout 150 $PY benchmarks/qlora_memory.py --device cuda --dtype bfloat16 --layers 8 --vocab 32000 --tokens 1024 \
  --batch 1 --gradient_checkpointing --adapter mtlora --kbits 16,8,4 \
  --out "$OUTDIR/qlora_memory_cuda.json" || echo "qlora_memory failed: $?"
echo "== vLLM multi-LoRA (component exports)"
left=$((560 - SECONDS))
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
  echo "vllm not installed: vLLM multi-LoRA check skipped"
elif [ "$left" -lt 60 ]; then
  echo "vllm_lora_check skipped: only ${left}s of the 560 s budget left"
else
  timeout "$left" $PY benchmarks/vllm_lora_check.py --out "$OUTDIR/vllm_lora_check.json" || echo "vllm_lora_check failed: $?"
fi
ls -l "$OUTDIR"
