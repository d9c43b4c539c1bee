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
  :math:`W = V \mathrm{diag}(w) Vᵀ` (``B = U Σ Vᵀ``), :math:`L_B = ‖W D W‖_F^2`. Because ``W`` comes from the
  **current** B - an ``r × r`` eigen-decomposition of its detached Gram matrix ``BᵀB = V Σ² Vᵀ`` (no tall SVD)
  at every application - this is exactly :math:`\sum_k w_k^4 (σ_k² - s²)²`: each singular value is pulled
  towards ``s`` with strength decaying in ``σ_k``, so low-SV (noise) directions are orthonormalised and high-SV
  (shared) ones left alone. The term is added on every micro-batch. The eigh is batched over all matrices and is
  a small part of the term's cost (~4% for LLaMA-7B's 512 block matrices on CPU, ``benchmarks/spectral_cost.py``).
  ``spectral_reg_steps`` has no effect in this mode (it is the paper mode's trigger;
  :meth:`SpectralRegularizer.notes` says so, and the trainer logs it once).

  ``spectral_reg_refresh_steps=N`` (opt-in) amortises the eigh: ``W`` is cached per adapter and recomputed
  every N optimizer steps. A ``W`` computed while a B is still all zero (step 0: it would be the identity, i.e.
  the uniform term) is never cached - it is recomputed at every application until every B is non-zero. The
  cached weights and the last refresh step are part of the checkpointed state.

* ``mode="uniform"`` - every weight is 1: :math:`L_B = ‖BᵀB - s² I‖_F^2`, added on every micro-batch. This is
  the uniform orthogonality regularizer the paper argues against (it also flattens the high-SV directions);
  it exists for ablations such as Figure 1A's regularization-routing trade-off.

In every mode the loss is the mean over the matrices used, multiplied by ``spectral_reg_lambda``. All state
that later steps depend on (paper triggers, cached weights, counters) is saved in every Trainer checkpoint
(:data:`STATE_FILE`, written by :meth:`SpectralRegularizer.save`) and restored on resume.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlora.config import MtLoraConfig
from mtlora.errors import MtLoraError
from mtlora.layers import MultiExpertLoRA


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
    if experts == list(range(module.num_experts)):
        b = module.router.experts_view(module.lora_B, module.num_experts)  # (d_out, E, r_e), a view
        return torch.einsum("oer,oes->ers", b, b)
    Bs = torch.stack([module.expert_B(e) for e in experts])
    return Bs.transpose(-1, -2) @ Bs


#: File (inside a Trainer checkpoint) holding the regularizer's schedule state and cached weights.
STATE_FILE = "spectral_state.safetensors"
_STATE_VERSION = 1


class SpectralRegularizer:
    """Computes ``λ · L_spec`` for a model and decides when it applies (see the module docstring).

    Call ``reg(model, global_step, epoch)`` once per micro-batch; it returns ``None`` when the term does not
    apply to this micro-batch (paper mode between triggers), else a scalar tensor with gradient to the B's.

    Everything that makes a later call depend on an earlier one (paper mode's last trigger step/epoch, the
    opt-in refresh's last refresh step and cached weights, the counters) is in :meth:`state_dict`, so a run
    resumed from a checkpoint continues exactly where the killed one stopped.
    """

    def __init__(self, config: MtLoraConfig) -> None:
        self.mode = config.spectral_reg_mode
        self.lam = float(config.spectral_reg_lambda)
        self.steps = config.spectral_reg_steps
        self.frequency = config.spectral_reg_frequency
        self.max_matrices = config.spectral_reg_max_matrices
        # Amortised weights are an explicit opt-in of the spectral mode; None = fresh weights every application.
        self.refresh_steps = config.spectral_reg_refresh_steps if self.mode == "spectral" else None
        self._last_step = -1
        self._last_epoch = -1
        self._last_refresh: int | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self.num_applications = 0
        #: How many matrices' weights W were computed (eigen-decompositions), over all applications.
        self.num_weight_computations = 0

    def notes(self) -> list[str]:
        """Flags that were given but have no effect in this mode (logged once by the trainer, never silent)."""
        out: list[str] = []
        if self.mode != "paper" and self.steps is not None:
            what = (
                "weights from the current B's singular values"
                if self.mode == "spectral"
                else "unit weights (w = 1)"
            )
            out.append(
                f"--spectral_reg_steps {self.steps} has no effect with --spectral_reg_mode {self.mode}: the term "
                f"is added on every micro-batch with {what}. The released trigger schedule (steps N-1, 2N-1, ...) "
                "is --spectral_reg_mode paper; amortised weights are --spectral_reg_refresh_steps N."
            )
        return out

    @property
    def has_schedule_state(self) -> bool:
        """True when the result of later steps depends on saved state (paper triggers, cached weights)."""
        return self.lam != 0 and (self.mode == "paper" or self.refresh_steps is not None)

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

    def _cached_weights(
        self, module: MultiExpertLoRA, experts: list[int], gram: torch.Tensor, refresh: bool
    ) -> torch.Tensor:
        """Opt-in amortised weights: W of every expert of ``module``, recomputed when ``refresh`` is due.

        Weights computed while any expert's B is still all zero (its Gram has zero trace, e.g. at step 0) are
        used for this application but not cached - they would be the identity, i.e. the uniform term - so they
        are recomputed at every application until every B of the module is non-zero.
        """
        key = module.name
        if refresh or key not in self._weights:
            all_grams = (
                gram.detach()
                if experts == list(range(module.num_experts))
                else expert_grams(module, list(range(module.num_experts))).detach()
            )
            W = weights_from_gram(all_grams)
            self.num_weight_computations += W.shape[0]
            if bool((all_grams.diagonal(dim1=-2, dim2=-1).sum(-1) > 0).all()):
                self._weights[key] = W
            else:
                self._weights.pop(key, None)
        else:
            W = self._weights[key]
        return W[experts].to(gram.dtype)

    def __call__(self, model: nn.Module, global_step: int, epoch: float = 0.0) -> torch.Tensor | None:
        if self.lam == 0 or not self.should_apply(global_step, epoch):
            return None
        chosen = self._selection(model, global_step)
        if not chosen:
            return None
        refresh = self.refresh_steps is not None and (
            self._last_refresh is None or global_step - self._last_refresh >= self.refresh_steps
        )
        parts: list[torch.Tensor] = []
        batched: dict[
            tuple, list[torch.Tensor]
        ] = {}  # spectral (fresh W) and uniform: Gram matrices by shape
        count = 0
        for module, experts in chosen.items():
            count += len(experts)
            if self.mode == "paper":
                parts.append(paper_spectral_term(torch.stack([module.expert_B(e) for e in experts])))
                continue
            gram = expert_grams(module, experts)
            if self.mode == "spectral" and self.refresh_steps is not None:
                parts.append(
                    spectral_term_from_gram(gram, self._cached_weights(module, experts, gram, refresh))
                )
            else:
                batched.setdefault((gram.shape[-1], gram.dtype, gram.device), []).append(gram)
        for grams in batched.values():
            # All matrices of a shape in one batch: at r=16 the per-call overhead of the small r×r operations
            # (above all the eigh) dominates, so one call for all 512 LLaMA-7B matrices is several times cheaper
            # than one per adapter module (benchmarks/spectral_cost.py).
            gram = torch.cat(grams)
            if self.mode == "uniform":
                W = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype).expand_as(gram)
            else:  # the current B's own weights
                W = weights_from_gram(gram.detach())
                self.num_weight_computations += W.shape[0]
            parts.append(spectral_term_from_gram(gram, W))
        total = torch.stack([t.float().sum() for t in parts]).sum()
        if refresh:
            self._last_refresh = global_step
        if self.mode == "paper":
            self._last_step = global_step
            self._last_epoch = int(epoch)
        self.num_applications += 1
        return self.lam * total / count

    # -------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (plain values + ``weights``: name -> tensor)."""
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "last_step": self._last_step,
            "last_epoch": self._last_epoch,
            "last_refresh": self._last_refresh,
            "num_applications": self.num_applications,
            "num_weight_computations": self.num_weight_computations,
            "weights": {k: v.detach().cpu() for k, v in self._weights.items()},
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "spectral state") -> None:
        """Restore :meth:`state_dict`; a state of another mode or version is an error naming ``source``."""
        if state.get("version") != _STATE_VERSION:
            raise MtLoraError(
                f"{source}: unsupported spectral regularizer state version {state.get('version')!r} "
                f"(expected {_STATE_VERSION})"
            )
        if state.get("mode") != self.mode:
            raise MtLoraError(
                f"{source}: saved by --spectral_reg_mode {state.get('mode')}, this run uses {self.mode}"
            )
        try:
            self._last_step = int(state["last_step"])
            self._last_epoch = int(state["last_epoch"])
            last = state["last_refresh"]
            self._last_refresh = None if last is None else int(last)
            self.num_applications = int(state["num_applications"])
            self.num_weight_computations = int(state["num_weight_computations"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MtLoraError(f"{source}: malformed spectral regularizer state ({exc!r})") from None
        self._weights = dict(state.get("weights", {}))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` as one safetensors file (no pickle), atomically (temp file + rename)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {f"weights.{k}": v.contiguous() for k, v in state.pop("weights").items()}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"mtlora_spectral_state": json.dumps(state)})
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read a file written by :meth:`save` (safetensors: tensors and JSON metadata only, no pickle)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = (fh.metadata() or {}).get("mtlora_spectral_state")
                weights = {k.removeprefix("weights."): fh.get_tensor(k) for k in fh.keys()}
        except (OSError, SafetensorError) as exc:
            raise MtLoraError(f"{path}: cannot read the spectral regularizer state ({exc})") from None
        if meta is None:
            raise MtLoraError(f"{path}: not a spectral regularizer state (no mtlora_spectral_state metadata)")
        try:
            state = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise MtLoraError(f"{path}: malformed spectral regularizer state ({exc.msg})") from None
        if not isinstance(state, dict):
            raise MtLoraError(f"{path}: malformed spectral regularizer state (expected a JSON object)")
        state["weights"] = weights
        self.load_state_dict(state, source=str(path))
