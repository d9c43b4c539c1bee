"""Naive reference implementations the fused code is checked against (readable, slow, obviously right)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtlora.layers import MultiExpertLoRA


def naive_forward(m: MultiExpertLoRA, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert, per-group loop: y = scaling * sum_e repeat(pi_e, gs) * (B_e h), h = A x (dropout off)."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, m.in_features).float()
    h = x2 @ m.lora_A.float().T
    if m.style == "bottleneck":
        h = F.relu(h)
    d_out = m.out_features
    y = torch.zeros(x2.shape[0], d_out, dtype=torch.float32)
    if m.router_kind == "none":
        y = h @ m.lora_B.float().reshape(d_out, m.rank).T
    elif m.router_kind == "task":
        emb = m.router.embedding.weight.float()[task_ids]
        gate = torch.softmax(emb @ m.router.gate.weight.float().T, dim=-1)  # (B, E)
        tokens = x2.shape[0] // task_ids.numel()
        rs = m.rank // m.num_experts
        for e in range(m.num_experts):
            g = gate[:, e].repeat_interleave(tokens)[:, None]
            y = y + g * (h[:, e * rs : (e + 1) * rs] @ m.expert_B(e).float().T)
    else:
        G, E = m.num_groups, m.num_experts
        logits = (x2 @ m.router.weight.float().T).view(-1, G, E)
        if m.router.top_k is not None:
            kth = logits.topk(m.router.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        pi = torch.softmax(logits, dim=-1)
        gs = d_out // G
        for e in range(E):
            out_e = h @ m.expert_B(e).float().T  # full d_out output of expert e
            weight = pi[:, :, e].repeat_interleave(gs, dim=-1)  # (N, d_out)
            y = y + weight * out_e
    return (y * m.scaling).reshape(*shape, d_out)
