"""Routers: how much each expert contributes, per token (and per group of output dimensions) or per task.

All routers return probabilities in fp32, shaped ``(N, G, E)`` for N flattened tokens, G routing groups and
E experts (G=1 is the classic scalar router). The softmax always runs in fp32, also under bf16 autocast,
because tiny logit differences decide the routing and bf16 has 8 mantissa bits.

* :class:`TokenRouter` - a bias-free ``Linear(d_in -> E*G)`` on the token's input (HydraLoRA / mtLoRA).
  The logits are laid out **group-major**: logit ``j = g*E + e``, i.e. ``view(..., G, E)``, and the softmax
  runs over experts inside each group. Group g covers output dimensions ``[g*gs, (g+1)*gs)``.
* :class:`TaskRouter` - MMoELoRA's task gate: ``Embedding(task_num, dim) -> Linear(dim -> E) -> softmax``,
  one gate per sample, broadcast over that sample's tokens. With ``general_task`` (the released MMoELoRA) the
  embedding has ``task_num + 1`` rows; the extra "general" id ``task_num`` is used when no task id arrives.
* ``top_k`` keeps the k largest logits per (token, group) and renormalises over them (others get 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import ConfigError, MtLoraError


def _softmax_topk(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


class TokenRouter(nn.Module):
    """Token-level router: scalar (``num_groups=1``) or fine-grained (``num_groups=G``)."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        num_groups: int = 1,
        top_k: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.top_k = top_k
        self.weight = nn.Parameter(
            torch.empty(num_experts * num_groups, in_features, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``(N, G, E)`` (autocast disabled so the router never runs in bf16)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = F.linear(x.float(), self.weight.float())
        return flat.view(x.shape[0], self.num_groups, self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probs_from_logits(self.logits(x))

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 probabilities ``(N, G, E)`` from logits laid out ``(N, G*E)`` or ``(N, G, E)`` (group-major).

        Split from :meth:`forward` so that :class:`mtlora.layers.MultiExpertLoRA` can compute the logits in
        the same GEMM as its down-projection and still route exactly like this module.
        """
        return _softmax_topk(logits.reshape(logits.shape[0], self.num_groups, self.num_experts), self.top_k)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, experts={self.num_experts}, groups={self.num_groups}, top_k={self.top_k}"


class TaskRouter(nn.Module):
    """MMoELoRA task gate: one softmax over experts per sample, from a learned task embedding.

    ``general_task=True`` reproduces the released module: ``task_num + 1`` embedding rows, and a call without
    task ids routes every sample through the extra "general" row ``task_num`` (which training with task ids
    never updates). ``False`` (mtlora's default) has ``task_num`` rows and requires task ids.
    """

    def __init__(
        self,
        task_num: int,
        num_experts: int,
        embedding_dim: int = 64,
        top_k: int | None = None,
        *,
        general_task: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.task_num = task_num
        self.num_experts = num_experts
        self.top_k = top_k
        self.general_task = general_task
        rows = task_num + 1 if general_task else task_num
        self.embedding = nn.Embedding(rows, embedding_dim, device=device, dtype=dtype)
        self.gate = nn.Linear(embedding_dim, num_experts, bias=False, device=device, dtype=dtype)

    @property
    def general_id(self) -> int | None:
        """The "general" task id (``task_num``) of a ``general_task`` router, else None."""
        return self.task_num if self.general_task else None

    def forward(self, task_ids: torch.Tensor | None, batch_size: int, tokens_per_sample: int) -> torch.Tensor:
        """Gate probabilities ``(batch_size * tokens_per_sample, 1, E)`` for the flattened tokens.

        ``task_ids`` has one id per sample; if the activations carry ``k`` times as many samples (beam
        search, ``num_return_sequences``) each id is repeated ``k`` times, matching ``generate``'s expansion.
        ``None`` (only with ``general_task``) routes every sample through the general id.
        """
        if task_ids is None:
            if not self.general_task:
                raise MtLoraError("this task gate needs task_ids (it has no general task id)")
            task_ids = torch.full((batch_size,), self.task_num, dtype=torch.long)
        task_ids = task_ids.reshape(-1).to(self.embedding.weight.device)
        if task_ids.numel() != batch_size:
            if task_ids.numel() == 0 or batch_size % task_ids.numel() != 0:
                raise MtLoraError(
                    f"task_ids has {task_ids.numel()} entries but the batch has {batch_size} samples"
                )
            task_ids = task_ids.repeat_interleave(batch_size // task_ids.numel())
        rows = self.embedding.num_embeddings
        if int(task_ids.min()) < 0 or int(task_ids.max()) >= rows:
            raise MtLoraError(
                f"task id out of range: got {task_ids.min().item()}..{task_ids.max().item()}, "
                f"the adapter was built with task_num={self.task_num}"
                + (f" (ids 0..{self.task_num}, {self.task_num} = general)" if self.general_task else "")
            )
        with torch.autocast(device_type=task_ids.device.type, enabled=False):
            logits = F.linear(self.embedding(task_ids).float(), self.gate.weight.float())
        probs = _softmax_topk(logits, self.top_k)  # (B, E)
        return probs.repeat_interleave(tokens_per_sample, dim=0).unsqueeze(1)


def num_groups_for(out_features: int, group_size: int | None, fine_grained: bool, where: str = "") -> int:
    """Number of routing groups G; a group size that does not divide ``out_features`` is an error."""
    if not fine_grained:
        return 1
    gs = group_size if group_size is not None else max(out_features // 2, 1)
    if out_features % gs != 0:
        raise ConfigError(
            f"routing_group_size={gs} does not divide the output size {out_features}"
            + (f" of {where}" if where else "")
            + f"; valid group sizes are divisors of {out_features}"
        )
    return out_features // gs
