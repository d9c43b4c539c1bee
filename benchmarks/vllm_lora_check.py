"""vLLM multi-LoRA serving of ``mtlora export`` component exports: load two task LoRAs, generate in one batch.

The documented recipe (README "Deploying") is ``vllm serve BASE --enable-lora --max-lora-rank R --lora-modules
a=X/a b=X/b``. This script runs its Python form on a GPU machine with vLLM installed
(``benchmarks/gpu_check.sh`` calls it) and checks what serving needs: both exported LoRAs load next to each
other on one base, and each request routed to a LoRA generates what plain peft generates with that LoRA
(greedy, same dtype; the share of matching tokens is reported, since bf16 kernels may round differently).

Steps: build a small random-initialised Llama (head dim 64, the bundled tokenizer's 512-token vocabulary,
saved as a plain HF folder), give it a HydraLoRA adapter with random experts, ``mtlora export`` it per task
(rank 8, which vLLM accepts), then serve. Without vLLM (``import vllm`` fails) it prints a skip line and exits
0; ``--prepare_only`` stops after the export (what the CPU test runs).

Writes ``--out`` (JSON): per task, the vLLM and peft continuations and their token agreement.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

PROMPTS = ["Once upon a time", "The little dog"]
TASKS = ("a", "b")


def prepare(work: Path, device: str = "cpu") -> tuple[Path, Path]:
    """(base folder, export folder): a small Llama saved with the bundled tokenizer, and its per-task LoRAs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mtlora import MtLoraConfig, get_mtlora_model
    from mtlora.data import save_records, save_task_map
    from mtlora.export import export_adapter
    from mtlora.hub import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("mtlora:stories260k"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    base_dir = work / "base"
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    model = get_mtlora_model(
        base,
        MtLoraConfig(method="hydralora", lora_rank=8, lora_nums=2, base_model_name_or_path=str(base_dir)),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.5)
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    save_task_map({t: i for i, t in enumerate(TASKS)}, adapter / "task_map.json")
    recs = [
        {"instruction": "Say it.", "input": w, "output": w, "task_type": t}
        for t in TASKS
        for w in ("x", "yy")
    ]
    save_records(recs, work / "recs.json")
    out = work / "exported"
    export_adapter(
        adapter, out, calibration_data=work / "recs.json", evaluate=False, device=device, overwrite=True
    )
    return base_dir, out


def peft_generate(base_dir: Path, lora: Path, new_tokens: int, dtype: str) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype)).cuda(), str(lora)
    ).eval()
    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").to("cuda")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        outs.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "vllm_lora_check.json"))
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--prepare_only", action="store_true", help="build base + exports, no vLLM (CPU)")
    args = p.parse_args(argv)
    if not args.prepare_only and importlib.util.find_spec("vllm") is None:
        print("vllm is not installed: vLLM multi-LoRA check skipped (pip install vllm on a GPU machine)")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        base_dir, exported = prepare(work)
        report = json.loads((exported / "report.json").read_text())
        result: dict[str, Any] = {
            "base": str(base_dir),
            "exports": {t: report["tasks"][t]["dir"] for t in TASKS},
        }
        if args.prepare_only:
            result["vllm"] = "not run (--prepare_only)"
        else:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest

            llm = LLM(
                model=str(base_dir), enable_lora=True, max_lora_rank=8, max_loras=len(TASKS), dtype=args.dtype,
                enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256,
            )  # fmt: skip
            params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
            prompts, requests = [], []
            for i, t in enumerate(TASKS):  # one batch, two different LoRAs
                for text in PROMPTS:
                    prompts.append(text)
                    requests.append(LoRARequest(t, i + 1, str(exported / report["tasks"][t]["dir"])))
            outs = llm.generate(prompts, params, lora_request=requests)
            for i, t in enumerate(TASKS):
                got = [list(o.outputs[0].token_ids) for o in outs[i * len(PROMPTS) : (i + 1) * len(PROMPTS)]]
                want = peft_generate(
                    base_dir, exported / report["tasks"][t]["dir"], args.new_tokens, args.dtype
                )
                same = sum(int(a == b) for g, w in zip(got, want) for a, b in zip(g, w))
                total = sum(len(w) for w in want)
                result.setdefault("tasks", {})[t] = {
                    "vllm": got,
                    "peft": want,
                    "token_agreement": same / total,
                }
            result["vllm"] = "ran"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    agree = {t: r["token_agreement"] for t, r in result.get("tasks", {}).items()}
    print(f"vllm={result['vllm']} token_agreement={json.dumps(agree)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
