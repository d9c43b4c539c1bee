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
    if m.style in ("bottleneck", "adaptformer"):
        h = F.relu(h)
    scales = m.expert_scales.float() if m.expert_scales is not None else torch.ones(m.num_experts)
    d_out = m.out_features
    y = torch.zeros(x2.shape[0], d_out, dtype=torch.float32)
    if m.router_kind == "none":
        y = (h @ m.lora_B.float().reshape(d_out, m.rank).T) * scales[0]
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
            out_e = (h @ m.expert_B(e).float().T) * scales[e]  # full d_out output of expert e
            weight = pi[:, :, e].repeat_interleave(gs, dim=-1)  # (N, d_out)
            y = y + weight * out_e
    return (y * m.scaling).reshape(*shape, d_out)


class ReleasedAdaptFormerBlockAdapter(torch.nn.Module):
    """Re-implementation of the released ``MoEAdaptFormerBlockAdapter`` (``peft/tuners/block_adapters.py``
    of doem97/ICLR26_mtLoRA @ 61dea0d; paper_code_spec.md section 5.3), written from the spec, loop for loop:

    ``hidden = ReLU(lora_A(dropout(x)))``; one expert: ``expert_scales[0] * lora_B[0](hidden)``; else
    ``route_weight = softmax(lora_route(x))`` (fp32, cast to x's dtype; FGR: viewed ``(..., G, E)`` and each
    group weight repeated over ``routing_group_size`` dims) and ``sum_i w_i * expert_scales[i] * lora_B[i](hidden)``
    starting from zeros. No alpha/r. ``last_blc`` = cv^2 of the mean routing weights (training only).
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        num_experts: int,
        enable_fine_grained_routing: bool = False,
        routing_group_size: int = 1,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        nn = torch.nn
        self.num_experts = num_experts
        self.enable_fine_grained_routing = enable_fine_grained_routing
        self.routing_group_size = routing_group_size
        self.lora_A = nn.Linear(dim, rank, bias=False)
        self.lora_B = nn.ModuleList([nn.Linear(rank, dim, bias=False) for _ in range(num_experts)])
        self.expert_scales = nn.ParameterList(
            [nn.Parameter(torch.full((1,), init_scale)) for _ in range(num_experts)]
        )
        self.num_groups = dim // routing_group_size if enable_fine_grained_routing else 1
        self.lora_route = (
            nn.Linear(dim, num_experts * self.num_groups, bias=False) if num_experts > 1 else None
        )
        self.last_blc: torch.Tensor | None = None

    def load_from(self, m: MultiExpertLoRA) -> ReleasedAdaptFormerBlockAdapter:
        """Copy the weights of an mtlora adaptformer adapter (same values in, as the other style checks do)."""
        with torch.no_grad():
            self.lora_A.weight.copy_(m.lora_A)
            for i in range(self.num_experts):
                self.lora_B[i].weight.copy_(m.lora_B[:, i, :])
                self.expert_scales[i].copy_(m.expert_scales[i : i + 1])
            if self.lora_route is not None:
                self.lora_route.weight.copy_(m.router.weight)
        return self

    @staticmethod
    def cv_squared(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.zeros((), dtype=x.dtype)
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.lora_A(x))
        if self.num_experts == 1:
            self.last_blc = None
            return self.expert_scales[0] * self.lora_B[0](hidden)
        logits = self.lora_route(x)
        result = torch.zeros_like(x)
        if self.enable_fine_grained_routing:
            logits = logits.view(*logits.shape[:-1], self.num_groups, self.num_experts)
            route = torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
            for i in range(self.num_experts):
                w = route[..., i].repeat_interleave(self.routing_group_size, dim=-1)
                result = result + w * (self.expert_scales[i] * self.lora_B[i](hidden))
            mean = route.mean(dim=tuple(range(route.dim() - 1)))
        else:
            route = torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
            for i in range(self.num_experts):
                result = result + route[..., i].unsqueeze(-1) * (
                    self.expert_scales[i] * self.lora_B[i](hidden)
                )
            mean = route.mean(dim=tuple(range(route.dim() - 1)))
        self.last_blc = self.cv_squared(mean) if self.training else None
        return result
