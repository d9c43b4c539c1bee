"""MMoELoRA's task gate: ``Embedding(task_num, dim) -> Linear(dim -> E) -> softmax``, one gate per sample.

The rank is split across the experts: expert e owns rows ``[e*r/E, (e+1)*r/E)`` of A and the matching columns
of B, so ``lora_B`` is ``(d_out, 1, r)`` and the forward is ``y = B (gate ⊙ h)`` with the per-sample gate
repeated over each expert's rank slice and broadcast over that sample's tokens. With ``general_task`` (the
released MMoELoRA) the embedding has ``task_num + 1`` rows; the extra "general" id ``task_num`` is used when
no task id arrives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import ConfigError, MtLoraError
from mtlora.routing.base import BadField, Router, RoutingState, softmax_topk


class TaskRouter(Router):
    """MMoELoRA task gate: one softmax over experts per sample, from a learned task embedding.

    ``general_task=True`` reproduces the released module: ``task_num + 1`` embedding rows, and a call without
    task ids routes every sample through the extra "general" row ``task_num`` (which training with task ids
    never updates). ``False`` (mtlora's default) has ``task_num`` rows and requires task ids.
    """

    kind = "task"
    needs_task_ids = True
    static_source = "task_gate"
    supports_expert_scales = False

    def __init__(
        self,
        task_num: int,
        num_experts: int,
        embedding_dim: int = 64,
        top_k: int | None = None,
        *,
        general_task: bool = False,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.task_num = task_num
        self.num_experts = num_experts
        self.top_k = top_k
        self.general_task = general_task
        self.name = name
        rows = task_num + 1 if general_task else task_num
        self.embedding = nn.Embedding(rows, embedding_dim, device=device, dtype=dtype)
        self.gate = nn.Linear(embedding_dim, num_experts, bias=False, device=device, dtype=dtype)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, cfg: Any, bad: BadField) -> None:
        if cfg.lora_rank % cfg.expert_num != 0:
            bad(
                "lora_rank",
                f"mmoelora splits the rank across experts: must be divisible by expert_num={cfg.expert_num}",
            )
        if cfg.task_num is not None and cfg.task_num < 1:
            bad("task_num", "must be >= 1")
        if cfg.enable_blc:
            bad("enable_blc", "mmoelora has a task gate, not a token router; the balance loss does not apply")

    @classmethod
    def prepare_config(cls, cfg: Any, task_map: Mapping[str, int] | None) -> None:
        """``task_num`` defaults to the number of tasks in the data, and may not be smaller."""
        n = len(task_map or {})
        if cfg.task_num is None:
            cfg.task_num = n
        if cfg.task_num < n:
            raise ConfigError(f"--task_num {cfg.task_num}: the data has {n} tasks")

    @classmethod
    def build(  # type: ignore[override]
        cls,
        *,
        rank: int,
        num_experts: int,
        top_k: int | None = None,
        task_num: int | None = None,
        task_embedding_dim: int = 64,
        general_task: bool = False,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        **_: Any,
    ) -> TaskRouter:
        if rank % num_experts != 0:
            raise MtLoraError(f"mmoelora rank {rank} is not divisible by {num_experts} experts")
        if not task_num:
            raise MtLoraError(
                "mmoelora needs task_num (the number of tasks); set it or let training infer it from the data"
            )
        return cls(
            task_num,
            num_experts,
            task_embedding_dim,
            top_k,
            general_task=general_task,
            name=name,
            device=device,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ parameter layout
    def b_shape(self, out_features: int, rank: int) -> tuple[int, int, int]:
        return (out_features, 1, rank)  # rank-split experts: one B, expert e owns a column block

    def init_lora_A(self, lora_A: torch.Tensor, relu: bool) -> None:
        nn.init.normal_(lora_A, std=0.01)  # MMoELoRA: A ~ N(0, 0.01^2), B = 0

    @classmethod
    def experts_view(cls, lora_B: torch.Tensor, num_experts: int) -> torch.Tensor:
        d_out, _, rank = lora_B.shape
        return lora_B[:, 0].view(d_out, num_experts, rank // num_experts)

    # ------------------------------------------------------------------ routing
    @property
    def general_id(self) -> int | None:
        """The "general" task id (``task_num``) of a ``general_task`` router, else None."""
        return self.task_num if self.general_task else None

    def forward(
        self, x2: torch.Tensor, state: RoutingState | None = None, batch_shape: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """Gate probabilities ``(N, 1, E)`` for the N flattened tokens of a batch of ``batch_shape[0]`` samples."""
        task_ids = state.task_ids if state is not None else None
        if task_ids is None and not self.general_task:
            raise MtLoraError(
                f"{self.name or 'mmoelora adapter'}: this adapter routes by task id; pass task_ids=<LongTensor (batch,)> "
                "to the model's forward()/generate()"
            )
        batch = batch_shape[0] if batch_shape else 1
        return self.probs_for(task_ids, batch, x2.shape[0] // max(batch, 1))

    def probs_for(
        self, task_ids: torch.Tensor | None, batch_size: int, tokens_per_sample: int
    ) -> torch.Tensor:
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
        probs = softmax_topk(logits, self.top_k)  # (B, E)
        return probs.repeat_interleave(tokens_per_sample, dim=0).unsqueeze(1)

    def mix(self, h: torch.Tensor, probs: torch.Tensor | None, scales: torch.Tensor | None) -> torch.Tensor:
        """``z = h ⊙ gate``, each expert's gate repeated over its ``r/E`` rank slice."""
        assert probs is not None
        gate = probs[:, 0, :].to(h.dtype)  # (N, E)
        return h * gate.repeat_interleave(h.shape[1] // self.num_experts, dim=-1)

    # ------------------------------------------------------------------ static form (export)
    def static_for_task(self, task_id: int) -> torch.Tensor:
        """The exact gate of task ``task_id`` as ``(1, E)`` (fp32, CPU): MMoELoRA's per-task export is exact."""
        ids = torch.tensor([int(task_id)], device=self.embedding.weight.device)
        with torch.no_grad():
            return self.probs_for(ids, 1, 1)[0].float().cpu()

    def check_static(self, probs: torch.Tensor, name: str) -> None:
        if tuple(probs.shape) != (1, self.num_experts):
            raise MtLoraError(
                f"{name}: task gate has shape {tuple(probs.shape)}, expected (1, {self.num_experts})"
            )

    def collapse_B(self, b: torch.Tensor, probs: torch.Tensor | None, name: str) -> torch.Tensor:
        """Expert e scales its rank slice of B's columns by its gate: ``B diag(gate ⊗ 1_{r/E})``."""
        if probs is None:
            raise MtLoraError(f"{name}: a routed adapter needs static routing weights to export")
        self.check_static(probs, name)
        gate = probs[0].float().to(b.device).repeat_interleave(b.shape[2] // self.num_experts)
        return b[:, 0, :] * gate[None, :]
