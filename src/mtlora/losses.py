r"""Auxiliary losses: the load-balancing loss and the spectral-aware regularizer.

Balance loss
------------
For each token-routed adapter, average the routing probabilities over tokens (real tokens only by default;
``blc_ignore_padding=False`` reproduces the paper's average over all positions) and over routing groups,
giving ``p̄ ∈ R^E``; the layer term is ``cv²(p̄) = Var_unbiased(p̄) / (mean(p̄)² + 1e-10)``. The model loss
adds ``blc_alpha · mean_layers cv²``. It is computed inside the forward, so it carries gradient under
non-reentrant gradient checkpointing and DDP; the released code's version silently had none (reentrant
checkpointing ran it under ``no_grad``). :class:`~mtlora.model.MtLoraModel` raises instead of dropping it.

Spectral-aware regularization
-----------------------------
Each expert's up-projection ``B ∈ R^{d_out × r}`` (never A) is pushed towards orthonormal columns at the
common scale ``s² = ‖B‖²_F / r`` (the mean squared singular value), with weights that protect the
high-singular-value directions, where the shared knowledge lives:

.. math::  w_k = \exp(-σ_k / σ̄),\qquad σ̄ = \mathrm{mean}(σ) + 10^{-8},\qquad D = BᵀB - s² I_r

``σ``, ``w`` and ``s`` are computed without gradient; only ``BᵀB`` is differentiated.

* ``mode="paper"`` - the released code, exactly:
  :math:`L_B = \sum_{j,k} (w_j w_k D_{jk})^2 = ‖\mathrm{diag}(w)\, D\, \mathrm{diag}(w)‖_F^2` with ``σ`` from
  ``svdvals(B)`` (descending) - note ``w_k`` belongs to the k-th *singular direction* but multiplies the
  k-th *coordinate column* of B. At most 64 matrices are sampled (``random.Random(global_step)``, the same
  draw as the paper's ``random.seed(global_step); random.sample``, without reseeding the global RNG), and the
  term is added only on trigger micro-batches: with ``spectral_reg_steps=N`` at global steps N-1, 2N-1, ...
  (first micro-batch of the step), otherwise every ``spectral_reg_frequency`` epochs (as released this fires
  at step 0 while all B are zero, i.e. it is a no-op).
* ``mode="spectral"`` (default) - the weights are applied in B's own singular basis,
  :math:`W = V \mathrm{diag}(w) Vᵀ` (``B = U Σ Vᵀ``), :math:`L_B = ‖W D W‖_F^2`. With a fresh SVD this is
  :math:`\sum_k w_k^4 (σ_k² - s²)²`: each singular value is pulled towards ``s`` with strength decaying in
  ``σ_k``, so low-SV (noise) directions are orthonormalised and high-SV (shared) ones left alone. ``V`` and
  ``w`` are refreshed every ``spectral_reg_steps`` optimizer steps (default 50) from the ``r × r`` Gram
  matrix's eigen-decomposition (cheap: no tall SVD), and the term is added on every micro-batch.

* ``mode="uniform"`` - every weight is 1: :math:`L_B = ‖BᵀB - s² I‖_F^2`, added on every micro-batch. This is
  the uniform orthogonality regularizer the paper argues against (it also flattens the high-SV directions);
  it exists for ablations such as Figure 1A's regularization-routing trade-off.

In every mode the loss is the mean over the matrices used, multiplied by ``spectral_reg_lambda``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from mtlora.config import MtLoraConfig
from mtlora.layers import MultiExpertLoRA

DEFAULT_REFRESH_STEPS = 50


def balance_loss(terms: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Mean of the per-layer cv² terms collected during a forward (None if nothing was routed)."""
    if not terms:
        return None
    return torch.stack([t.float() for t in terms]).mean()


def expert_matrices(model: nn.Module) -> list[tuple[str, MultiExpertLoRA, int]]:
    """``(adapter name, adapter, expert index)`` for every B_e of every routed or plain adapter, in order."""
    out: list[tuple[str, MultiExpertLoRA, int]] = []
    for module in model.modules():
        if isinstance(module, MultiExpertLoRA):
            for e in range(module.num_experts):
                out.append((module.name, module, e))
    return out


def paper_spectral_term(B: torch.Tensor) -> torch.Tensor:
    """The released code's per-matrix term ``Σ_jk (w_j w_k D_jk)²`` (coordinate-indexed weights)."""
    gram = B.transpose(-1, -2) @ B
    r = B.shape[-1]
    with torch.no_grad():
        sv = torch.linalg.svdvals(B.float())
        w = torch.exp(-sv / (sv.mean(-1, keepdim=True) + 1e-8))
        s = B.float().norm(dim=(-2, -1)) / r**0.5 + 1e-8
    eye = torch.eye(r, device=B.device, dtype=gram.dtype)
    D = gram - (s**2).to(gram.dtype)[..., None, None] * eye
    ww = (w[..., :, None] * w[..., None, :]).to(gram.dtype)
    return ((ww * D) ** 2).sum(dim=(-2, -1))


def spectral_weights(B: torch.Tensor) -> torch.Tensor:
    """``W = V diag(w) Vᵀ`` (detached) from the eigen-decomposition of ``BᵀB = V Σ² Vᵀ``; batched."""
    with torch.no_grad():
        return weights_from_gram(B.transpose(-1, -2) @ B)


def weights_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """``W = V diag(w) Vᵀ`` from Gram matrices ``(…, r, r)``: an r×r eigh, no tall SVD (detached)."""
    with torch.no_grad():
        evals, V = torch.linalg.eigh(gram.double())  # ascending
        sv = evals.clamp_min(0).sqrt()
        w = torch.exp(-sv / (sv.mean(-1, keepdim=True) + 1e-8))
        W = (V * w[..., None, :]) @ V.transpose(-1, -2)
    return W.to(gram.dtype)


def spectral_term(B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Spectral-basis term ``‖W (BᵀB - s² I) W‖²_F`` per matrix (W detached, s² = mean σ² detached)."""
    return spectral_term_from_gram(B.transpose(-1, -2) @ B, W)


def spectral_term_from_gram(gram: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """:func:`spectral_term` given the (differentiable) Gram matrices; ``s² = trace(BᵀB) / r``."""
    r = gram.shape[-1]
    eye = torch.eye(r, device=gram.device, dtype=gram.dtype)
    with torch.no_grad():
        s2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / r
    D = gram - s2[..., None, None] * eye
    return ((W @ D @ W) ** 2).sum(dim=(-2, -1))


def expert_grams(module: MultiExpertLoRA, experts: list[int]) -> torch.Tensor:
    """``B_eᵀ B_e`` for the given experts, ``(n, r, r)``. All experts: one contraction on ``lora_B`` in place,
    without materialising a stacked copy of the B's (128 MiB per LLaMA-7B layer)."""
    if module.router_kind != "task" and experts == list(range(module.num_experts)):
        return torch.einsum("oer,oes->ers", module.lora_B, module.lora_B)
    Bs = torch.stack([module.expert_B(e) for e in experts])
    return Bs.transpose(-1, -2) @ Bs


class SpectralRegularizer:
    """Computes ``λ · L_spec`` for a model and decides when it applies (see the module docstring).

    Call ``reg(model, global_step, epoch)`` once per micro-batch; it returns ``None`` when the term does not
    apply to this micro-batch (paper mode between triggers), else a scalar tensor with gradient to the B's.
    """

    def __init__(self, config: MtLoraConfig) -> None:
        self.mode = config.spectral_reg_mode
        self.lam = float(config.spectral_reg_lambda)
        self.steps = config.spectral_reg_steps
        self.frequency = config.spectral_reg_frequency
        self.max_matrices = config.spectral_reg_max_matrices
        self.refresh_steps = self.steps or DEFAULT_REFRESH_STEPS
        self._last_step = -1
        self._last_epoch = -1
        self._last_refresh: int | None = None
        self._weights: dict[int, torch.Tensor] = {}
        self.num_applications = 0

    # -------------------------------------------------------------- scheduling
    def should_apply(self, global_step: int, epoch: float = 0.0) -> bool:
        if self.mode != "paper":
            return True
        if self.steps is not None:
            return global_step - self._last_step >= self.steps
        return int(epoch) - self._last_epoch >= self.frequency

    def _selection(self, model: nn.Module, global_step: int) -> dict[MultiExpertLoRA, list[int]]:
        mats = expert_matrices(model)
        if self.max_matrices is not None and len(mats) > self.max_matrices:
            mats = random.Random(global_step).sample(mats, self.max_matrices)
        chosen: dict[MultiExpertLoRA, list[int]] = {}
        for _, module, e in mats:
            chosen.setdefault(module, []).append(e)
        return chosen

    def __call__(self, model: nn.Module, global_step: int, epoch: float = 0.0) -> torch.Tensor | None:
        if self.lam == 0 or not self.should_apply(global_step, epoch):
            return None
        chosen = self._selection(model, global_step)
        if not chosen:
            return None
        refresh = self.mode == "spectral" and (
            self._last_refresh is None or global_step - self._last_refresh >= self.refresh_steps
        )
        total: torch.Tensor | None = None
        count = 0
        for module, experts in chosen.items():
            if self.mode == "paper":
                terms = paper_spectral_term(torch.stack([module.expert_B(e) for e in experts]))
            elif self.mode == "uniform":
                gram = expert_grams(module, experts)
                eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
                terms = spectral_term_from_gram(gram, eye.expand_as(gram))
            else:
                key = id(module)
                gram = expert_grams(module, experts)
                if refresh or key not in self._weights:
                    all_grams = (
                        gram
                        if len(experts) == module.num_experts
                        else expert_grams(module, list(range(module.num_experts)))
                    )
                    self._weights[key] = weights_from_gram(all_grams.detach())
                W = self._weights[key][experts].to(gram.dtype)
                terms = spectral_term_from_gram(gram, W)
            s = terms.float().sum()
            total = s if total is None else total + s
            count += len(experts)
        if refresh:
            self._last_refresh = global_step
        if self.mode == "paper":
            self._last_step = global_step
            self._last_epoch = int(epoch)
        self.num_applications += 1
        assert total is not None
        return self.lam * total / count
