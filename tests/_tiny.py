"""Test helpers shared across test modules (importable by a unique name; `conftest` is not unique here)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A random-initialised causal LM, hidden 64, 2 layers, vocab 128 (fp32, eval mode)."""
    import transformers as T

    classes = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
        "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    cfg = config_cls(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def bundled_base() -> torch.nn.Module:
    """The bundled pretrained tiny Llama (``mtlora:stories260k``), fp32, eval mode: a real base, loaded fresh."""
    from transformers import AutoModelForCausalLM

    from mtlora.hub import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("mtlora:stories260k")).eval()


def two_task_records(path: Path) -> Path:
    """Write the 12-record, two-task ("repeat", "opposite") calibration/eval file the export tests share."""
    from mtlora.data import save_records

    recs = []
    for w in ["cat", "dog", "sun", "tree", "fish", "bird"]:
        recs.append({"instruction": "Repeat the word.", "input": w, "output": w, "task_type": "repeat"})
        recs.append(
            {"instruction": "Opposite of big?", "input": w, "output": f"small {w}", "task_type": "opposite"}
        )
    save_records(recs, path)
    return path
