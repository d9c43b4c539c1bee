"""Fused multi-expert LoRA layer vs the released code's per-expert loop: time, peak memory, FLOP bound.

What is compared (forward + backward of the adapter path alone, the base projection left out):

* **fused** - :class:`mtlora.layers.MultiExpertLoRA`: ``h = A x`` once, routing probabilities ``pi``,
  ``z = pi (x) h`` and ONE GEMM against ``lora_B.view(d_out, E*r)`` (scalar routing) or ONE batched matmul
  over the G output groups (fine-grained routing, FGR).
* **naive** - a faithful re-implementation of the paper code's loop (``peft/tuners/lora.py``, see
  ``shared/docs/paper_code_spec.md`` sections 2.2 and 4): ``h = A x`` once, then for every expert
  ``out_e = B_e(h)`` is a full ``(N, d_out)`` output, weighted by its routing probability (under FGR the
  ``(N, G)`` group probabilities ``repeat_interleave``'d to ``(N, d_out)``) and accumulated,
  ``y += w_e * out_e * scaling``. It runs on the SAME tensors as the fused layer (each ``B_e`` is a view of
  ``lora_B[:, e, :]``), and both are checked to agree (outputs and every gradient) before anything is timed.
  The released scalar branch even recomputes ``A x`` per expert; computing it once makes this baseline a
  little *faster* than the real code, i.e. the speedup reported here is conservative.

Also measured: how the cost grows with tokens, experts and groups (table + log-log PNG), the layer's time
against the time implied by its GEMM FLOP count at the GEMM rate measured in the same process, and the cost
of the spectral regularizer at LLaMA-7B block-FFN shapes (512 matrices of 4096 x 16).

Run ``python benchmarks/layer_speed.py [--quick]``; the last output line is
``fused_vs_naive_speedup=<x> memory_ratio=<y>`` for d=4096, r=16, E=16, scalar routing, 2048 tokens.
See ``benchmarks/README.md`` for the method and the numbers measured on the reference machine.

Allocation: every implementation must return two fresh ``(N, d)`` tensors (``y`` and ``dL/dx``, 32 MiB each at
the main shape). With 4 KiB pages the kernel page-faults each one in 8192 times (about 9 ms here), which is
not the layer's arithmetic. Run as a script, this benchmark therefore turns on PyTorch's own switch for 2 MiB
transparent huge pages on large CPU allocations, ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch >= 2.2; it must be set
before torch's first allocation, hence here, before ``import torch``). An explicit ``THP_MEM_ALLOC_ENABLE=0``
in the environment is respected. Full CPU runs also time the main config with 4 KiB pages and with glibc
buffer reuse in child processes (``allocator_variants`` in the JSON), so every setting's numbers are on record.
"""

# ruff: noqa: E402  (THP_MEM_ALLOC_ENABLE must be set before torch is imported)
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THP_ENV = "THP_MEM_ALLOC_ENABLE"
# None = unknown: torch was imported before this module (e.g. under pytest), so its allocator already read
# the variable and this module cannot know or change what it saw.
HUGE_PAGES: bool | None = None
if "torch" not in sys.modules:
    os.environ.setdefault(THP_ENV, "1")
    HUGE_PAGES = os.environ[THP_ENV] == "1"  # torch accepts exactly "0" and "1" (c10::utils::check_env)

import torch
import torch.nn.functional as F
from _common import (
    machine_info,
    peak_extra_memory,
    resolve_device,
    resolve_dtype,
    saved_tensor_bytes,
    time_interleaved,
    write_json,
)
from torch import nn

from mtlora.layers import MultiExpertLoRA

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "layer_speed.json"
# --quick writes elsewhere by default, so `make bench` never overwrites the full run's committed results
DEFAULT_QUICK_OUT = DEFAULT_OUT.with_name("layer_speed_quick.json")
SCALING = 64 / 16  # lora_alpha / r as in every shipped script (alpha 64, r 16); any value gives the same cost
TOKEN_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)  # tokens sweep, relative to --tokens
EXPERT_SWEEP = (2, 4, 8, 16, 32)
GROUP_SWEEP = (1, 2, 8, 32)  # G=2 is the paper's main FGR setting (group size 2048 at d=4096)
SPECTRAL_REFRESH_STEPS = 50  # mtlora.losses.DEFAULT_REFRESH_STEPS: how often spectral mode refreshes W
TARGETS = {"speedup_min": 5.0, "memory_ratio_max": 0.3, "flop_bound_ratio_max": 1.3}
MIB = 2**20
# glibc settings under which freed (N, d) buffers are reused instead of being munmap'd and page-faulted in again
# (see output_allocation): the full run repeats the main config with them, in a subprocess (they must be set
# before the process starts), to separate the layer's arithmetic from the allocator's cost.
MALLOC_REUSE_ENV = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "2000000000"}
# Allocation settings a full CPU run also times the main config under (each in a child process, since both
# glibc and torch read them once at start-up). A variant equal to the parent's own setting is skipped.
ALLOCATOR_VARIANTS: dict[str, dict[str, str]] = {
    "huge_pages": {THP_ENV: "1"},
    "4k_pages": {THP_ENV: "0"},
    "glibc_buffer_reuse": {THP_ENV: "0", **MALLOC_REUSE_ENV},
}
# What an unset variable means: torch treats an unset THP_MEM_ALLOC_ENABLE as "0", glibc unset MALLOC_* as its
# own defaults. A variant's full setting is {**ALLOCATOR_DEFAULTS, **variant}.
ALLOCATOR_DEFAULTS: dict[str, str] = {THP_ENV: "0", **{k: "" for k in MALLOC_REUSE_ENV}}
MAX_REPEATS = 15  # upper bound of the adaptive repeat count for cheap configs
SAMPLE_BUDGET_S = 4.0  # cheap configs repeat until about this much time of (fused + naive) samples


@dataclass(frozen=True)
class Shape:
    """One layer configuration: square ``d x d`` projection, rank, experts, routing groups, tokens."""

    d: int
    r: int
    experts: int
    groups: int
    tokens: int

    @property
    def name(self) -> str:
        return f"d{self.d}_r{self.r}_E{self.experts}_G{self.groups}_N{self.tokens}"

    @property
    def routing(self) -> str:
        return "scalar" if self.groups == 1 else f"fgr_g{self.groups}"


# ---------------------------------------------------------------------------------------------- the layers
class PaperExpertLoop:
    """The released code's per-expert loop, reading the parameters of a fused :class:`MultiExpertLoRA`.

    ``A`` and the router are the fused module's own parameters. Each expert's up-projection is a leaf view of
    ``lora_B[:, e, :]`` (same storage, no copy), so its gradient is a separate ``(d_out, r)`` tensor, exactly
    like the paper's ``E`` separate ``nn.Linear`` weights (a plain ``lora_B[:, e, :]`` autograd view would
    instead add a zero-filled ``(d_out, E, r)`` gradient per expert in backward, a cost the paper never had).
    """

    def __init__(self, layer: MultiExpertLoRA) -> None:
        assert layer.router is not None and layer.router_kind == "token", "needs a token-routed layer"
        self.layer = layer
        self.experts = [layer.lora_B.detach()[:, e, :].requires_grad_() for e in range(layer.num_experts)]

    def parameters(self) -> list[torch.Tensor]:
        """Trainable tensors, in the order of the fused layer's ``[lora_A, router.weight, lora_B]``."""
        assert self.layer.router is not None
        return [self.layer.lora_A, self.layer.router.weight, *self.experts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        assert m.router is not None
        n, g, e_num = x.shape[0], m.num_groups, m.num_experts
        x = x.to(m.lora_A.dtype)
        h = F.linear(m.dropout(x), m.lora_A)  # A once, shared by all experts (the paper's FGR branch)
        logits = F.linear(x.float(), m.router.weight.float()).view(n, g, e_num)  # group-major, fp32
        probs = torch.softmax(logits, dim=-1).to(h.dtype)
        gs = m.out_features // g
        y: torch.Tensor | None = None
        for e in range(e_num):
            out_e = F.linear(h, self.experts[e])  # (N, d_out): the full output of expert e
            w = probs[:, 0, e : e + 1] if g == 1 else probs[:, :, e].repeat_interleave(gs, dim=-1)
            term = w * out_e * m.scaling
            if y is None:
                y = term
            else:
                y += term
        assert y is not None
        return y


def build(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """A fused layer with non-zero B (B is zero at init), its paper loop, an input and an output gradient.

    ``x`` requires grad: every adapted projection except the first layer's receives activations that do, so
    the backward includes ``dL/dx`` (counted in the FLOPs).
    """
    torch.manual_seed(seed)
    layer = MultiExpertLoRA(
        shape.d,
        shape.d,
        shape.r,
        shape.experts,
        scaling=SCALING,
        router="token",
        num_groups=shape.groups,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(shape.tokens, shape.d, device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(shape.tokens, shape.d, device=device, dtype=dtype)
    return {"layer": layer, "loop": PaperExpertLoop(layer), "x": x, "grad_out": grad_out}


def layer_flops(shape: Shape) -> dict[str, Any]:
    """Matmul FLOPs of one forward + backward of the fused layer (multiply-add = 2 FLOPs).

    Forward GEMMs: ``A`` 2·N·d·r, router 2·N·d·E·G, expert contraction 2·N·E·r·d (G groups of d/G columns
    each, so independent of G). Backward: every GEMM needs its weight gradient and its input gradient
    (``x`` requires grad), i.e. 2x the forward, so total = 3x forward. Element-wise work (softmax over E,
    ``z = pi (x) h`` with N·G·E·r products, the ``* scaling`` pass over the N·r activations) is memory-bound and
    NOT counted:
    it is part of the overhead the ``fused_vs_flop_bound`` ratio measures. The paper loop does the same GEMM
    FLOPs plus about 3·E passes over an (N, d) tensor per forward (that is its cost, not extra FLOPs).
    """
    n, d, r, e, g = shape.tokens, shape.d, shape.r, shape.experts, shape.groups
    fwd = {"A": 2 * n * d * r, "router": 2 * n * d * e * g, "experts": 2 * n * e * r * d}
    fwd_total = sum(fwd.values())
    return {
        "forward": fwd,
        "forward_total": fwd_total,
        "backward_total": 2 * fwd_total,
        "total": 3 * fwd_total,
        "elementwise_not_counted": {"z_products": n * g * e * r, "scaling_pass": n * r},
        "formula": "3 * (2*N*d*r + 2*N*d*E*G + 2*N*E*r*d)",
    }


# ---------------------------------------------------------------------------------------------- measuring
def _zero_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def make_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grad_out: torch.Tensor,
    params: Sequence[torch.Tensor],
) -> Callable[[], None]:
    """One forward + backward; gradients are dropped afterwards so every call does identical work."""
    leaves = [x, *params]

    def step() -> None:
        y = forward(x)
        y.backward(grad_out)
        _zero_grads(leaves)

    return step


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def check_agreement(bundle: dict[str, Any], tol: float) -> dict[str, float]:
    """Run fused and loop once (doubles as warm-up); assert equal outputs and gradients; return the errors."""
    layer, loop, x, grad_out = bundle["layer"], bundle["loop"], bundle["x"], bundle["grad_out"]
    fused_params = [layer.lora_A, layer.router.weight, layer.lora_B]
    results = []
    for forward, params in ((layer, fused_params), (loop, loop.parameters())):
        y = forward(x)
        y.backward(grad_out)
        grads = [x.grad, params[0].grad, params[1].grad]
        grads.append(layer.lora_B.grad if forward is layer else torch.stack([p.grad for p in params[2:]], 1))
        results.append((y.detach(), [g.detach() for g in grads]))
        _zero_grads([x, *params])
    (y_f, g_f), (y_n, g_n) = results
    err_out = _rel_err(y_f, y_n)
    err_grad = max(_rel_err(a, b) for a, b in zip(g_f, g_n))
    if not (err_out <= tol and err_grad <= tol):
        raise AssertionError(f"fused and paper loop disagree: output {err_out:.2e}, grads {err_grad:.2e}")
    return {"max_rel_err_output": err_out, "max_rel_err_grads": err_grad, "tolerance": tol}


def gemm_probe(
    m: int, k: int, n: int, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[], Any], int]:
    """``torch.matmul`` of the layer's dominant shape ``(N, E*r) @ (E*r, d)`` into a preallocated output.

    ``out=`` keeps allocation/page-fault cost out of it: this is the machine's GEMM rate, against which the
    layer (which must allocate its outputs) is judged.
    """
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    return (lambda: torch.matmul(a, b, out=c)), 2 * m * k * n


def layer_gemms(shape: Shape, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """The fused layer's forward + backward matmuls at their real shapes, outputs preallocated.

    With dropout off in fp32 (as timed here) the layer computes ``A`` and the router in ONE GEMM against
    ``[A; R]`` (r + E·G rows). Forward: ``x [A;R]^T`` (N,d,r+E·G), ``z B^T`` (N,E·r,d; under FGR G batched
    products with d/G columns each). Backward: ``d[A;R]``, ``dx``, ``dz``, ``dB``. Their FLOPs are exactly
    :func:`layer_flops`' total, so the time of this function is what the layer would cost if it were
    nothing but GEMMs at their actual (partly skinny, memory-bound) shapes: it splits the gap between the
    FLOP bound and the measured layer into "GEMM shape efficiency" and "everything else".
    """
    n, d, r, e, g = shape.tokens, shape.d, shape.r, shape.experts, shape.groups
    er, gs, ar = e * r, d // g, r + e * g
    # (batch, m, k, n): batch 0 means a plain 2-D product
    dims = [(0, n, d, ar), (0, ar, n, d), (0, n, ar, d)]
    dims += (
        [(0, n, er, d), (0, n, d, er), (0, d, n, er)]
        if g == 1
        else [(g, n, er, gs), (g, n, gs, er), (g, er, n, gs)]
    )
    ops = []
    for b, m, k, nn_ in dims:
        lead = (b,) if b else ()
        a = torch.randn(*lead, m, k, device=device, dtype=dtype)
        w = torch.randn(*lead, k, nn_, device=device, dtype=dtype)
        c = torch.empty(*lead, m, nn_, device=device, dtype=dtype)
        ops.append((torch.bmm if b else torch.mm, a, w, c))

    def run() -> None:
        for op, a, w, c in ops:
            op(a, w, out=c)

    return run


def output_allocation(shape: Shape, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """Create, write and free the two ``(N, d)`` tensors every implementation of the layer must return.

    A forward + backward has to produce the output ``y`` and the input gradient ``dL/dx`` as fresh tensors;
    the FLOP bound (GEMM probe with ``out=``) contains neither. On CPU with glibc, an fp32 (2048, 4096)
    tensor is exactly 32 MiB, just above glibc's largest mmap threshold, so each one is ``mmap``'d,
    page-faulted in page by page and ``munmap``'d again: this function measures that floor.
    """
    n, d = shape.tokens, shape.d

    def run() -> None:
        for _ in range(2):
            torch.empty(n, d, device=device, dtype=dtype).fill_(1.0)

    return run


def measure_memory(
    step: Callable[[], None], exclude: Sequence[torch.Tensor], device: torch.device
) -> dict[str, Any]:
    """Extra peak bytes of one step (allocator events) and the bytes it saves for backward, in one run."""
    saved: list[int] = []
    peak, method = peak_extra_memory(lambda: saved.append(saved_tensor_bytes(step, exclude)), device)
    return {"peak_extra": peak, "saved_for_backward": saved[0], "method": method}


def bench_config(
    shape: Shape,
    *,
    probe: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Check, time (fused, loop, the layer's GEMMs alone and the GEMM-rate probe, interleaved) and measure
    memory for one shape. ``probe`` is the (m, k, n) of the rate probe: the MAIN config's dominant GEMM for
    every config, so that all FLOP bounds use the same machine rate (measured under the same load)."""
    t0 = time.perf_counter()
    bundle = build(shape, device, dtype)
    layer, loop, x, grad_out = bundle["layer"], bundle["loop"], bundle["x"], bundle["grad_out"]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    t_check = time.perf_counter()
    check = check_agreement(bundle, tol)
    t_check = time.perf_counter() - t_check
    # Cheap configs get more samples (up to MAX_REPEATS, ~SAMPLE_BUDGET_S of them): on a shared machine a
    # single scheduler hiccup is a large fraction of a 50 ms step, and extra repeats cost almost nothing.
    repeats = max(repeats, min(MAX_REPEATS, math.ceil(SAMPLE_BUDGET_S / max(t_check, 1e-6))))
    fused_params = [layer.lora_A, layer.router.weight, layer.lora_B]
    steps = {
        "fused": make_step(layer, x, grad_out, fused_params),
        "naive": make_step(loop, x, grad_out, loop.parameters()),
    }
    gemm, gemm_flops = gemm_probe(*probe, device, dtype)
    gemms = layer_gemms(shape, device, dtype)
    alloc = output_allocation(shape, device, dtype)
    gemm()  # warm-up; the two steps were warmed up by check_agreement
    gemms()
    alloc()
    timing = time_interleaved(
        {**steps, "gemm": gemm, "layer_gemms": gemms, "output_alloc": alloc},
        repeats=repeats,
        warmup=0,
        device=device,
    )
    del gemm, gemms  # free the probe buffers before measuring memory
    existing = [x, grad_out, *fused_params]
    memory = {name: measure_memory(step, existing, device) for name, step in steps.items()}
    flops = layer_flops(shape)
    gemm_rate = gemm_flops / timing["gemm"].median_s
    bound = flops["total"] / gemm_rate
    fused_s, naive_s = timing["fused"].median_s, timing["naive"].median_s
    rec = {
        "name": shape.name,
        "routing": shape.routing,
        "d": shape.d,
        "r": shape.r,
        "experts": shape.experts,
        "groups": shape.groups,
        "tokens": shape.tokens,
        "check": check,
        "repeats": repeats,
        "time_s": {"fused": timing["fused"].as_dict(), "naive": timing["naive"].as_dict()},
        "gemm_probe": {
            "shape_mkn": list(probe),
            "median_s": timing["gemm"].median_s,
            "gflops": gemm_rate / 1e9,
        },
        "memory_bytes": memory,
        "flops": flops,
        "flop_bound_s": bound,
        "fused_vs_flop_bound": fused_s / bound,
        "layer_gemms_s": timing["layer_gemms"].median_s,
        "layer_gemms_gflops": flops["total"] / timing["layer_gemms"].median_s / 1e9,
        "fused_vs_layer_gemms": fused_s / timing["layer_gemms"].median_s,
        # Diagnostic, not a target: the bound plus the cost of materialising y and dL/dx (output_allocation).
        "output_alloc_s": timing["output_alloc"].median_s,
        "fused_vs_flop_bound_plus_output_alloc": fused_s / (bound + timing["output_alloc"].median_s),
        "speedup": naive_s / fused_s,
        # Best-of-repeats view (every time at its minimum, GEMM rate at its maximum). On a shared machine a
        # 2-thread parallel region can stall for a whole scheduler slice when another process holds a core;
        # the minimum is the least disturbed sample. The median above is the headline statistic.
        "best": {
            "fused_s": timing["fused"].min_s,
            "naive_s": timing["naive"].min_s,
            "layer_gemms_s": timing["layer_gemms"].min_s,
            "gemm_gflops": gemm_flops / timing["gemm"].min_s / 1e9,
            "flop_bound_s": flops["total"] * timing["gemm"].min_s / gemm_flops,
            "speedup": timing["naive"].min_s / timing["fused"].min_s,
            "fused_vs_flop_bound": timing["fused"].min_s
            / (flops["total"] * timing["gemm"].min_s / gemm_flops),
        },
        "memory_ratio": memory["fused"]["peak_extra"] / max(memory["naive"]["peak_extra"], 1),
        "saved_ratio": memory["fused"]["saved_for_backward"] / max(memory["naive"]["saved_for_backward"], 1),
    }
    log(
        f"  {shape.name:<28} fused {fused_s * 1e3:8.1f} ms  naive {naive_s * 1e3:8.1f} ms  "
        f"x{rec['speedup']:5.2f}  mem {memory['fused']['peak_extra'] / MIB:7.1f} / "
        f"{memory['naive']['peak_extra'] / MIB:7.1f} MiB ({rec['memory_ratio']:.3f})  "
        f"bound {bound * 1e3:7.1f} ms ({rec['fused_vs_flop_bound']:.2f}x, GEMM {gemm_rate / 1e9:.0f} GFLOP/s)  "
        f"own GEMMs {rec['layer_gemms_s'] * 1e3:7.1f} ms  y+dx alloc {rec['output_alloc_s'] * 1e3:5.1f} ms  "
        f"[{time.perf_counter() - t0:.0f}s]"
    )
    return rec


# ---------------------------------------------------------------------------------------------- spectral
def bench_spectral(
    count: int, d: int, r: int, *, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, Any]:
    """Cost of the spectral regularizer on ``count`` up-projections of shape ``(d, r)``.

    (a) paper mode: ``paper_spectral_term`` (svdvals of every matrix + weighted Gram penalty), forward +
    backward, both as the released code runs it (a Python loop, one matrix at a time) and batched as mtlora
    runs it; (b) spectral mode: the weight refresh ``spectral_weights`` (eigh of the r x r Gram, no
    gradient) and the per-step term ``spectral_term`` (forward + backward); (c) reference: one batched
    ``torch.linalg.svd(full_matrices=False)`` in fp32 (there is no bf16 SVD kernel).
    """
    # Imported here: mtlora.losses pulls in mtlora.config and with it peft (seconds), which --quick never needs.
    from mtlora.losses import paper_spectral_term, spectral_term, spectral_weights

    torch.manual_seed(1)
    B = (0.02 * torch.randn(count, d, r, device=device)).to(dtype).requires_grad_()
    # The released code's matrices are separate parameters: give the loop separate leaves (views of B's
    # storage). Slicing B[i] from the stacked leaf instead would add a zero-filled (count, d, r) gradient
    # per matrix in backward - quadratic in count, and not a cost the paper code has.
    leaves = [b.requires_grad_() for b in B.detach().unbind(0)]
    W = spectral_weights(B)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        B.grad = None
        for b in leaves:
            b.grad = None

    fns: dict[str, Callable[[], Any]] = {
        "paper_term_loop": lambda: backward(torch.stack([paper_spectral_term(b) for b in leaves]).mean()),
        "paper_term_batched": lambda: backward(paper_spectral_term(B).mean()),
        "spectral_weights_refresh": lambda: spectral_weights(B),
        "spectral_term_step": lambda: backward(spectral_term(B, W).mean()),
        "svd_full_matrices_false": lambda: torch.linalg.svd(B.detach().float(), full_matrices=False),
    }
    timing = time_interleaved(fns, repeats=repeats, warmup=1, device=device)
    out: dict[str, Any] = {
        "matrices": count,
        "shape": [d, r],
        "dtype": str(dtype).replace("torch.", ""),
        "time_s": {name: t.as_dict() for name, t in timing.items()},
        "refresh_every_steps": SPECTRAL_REFRESH_STEPS,
    }
    out["spectral_mode_amortized_per_step_s"] = (
        timing["spectral_term_step"].median_s
        + timing["spectral_weights_refresh"].median_s / SPECTRAL_REFRESH_STEPS
    )
    return out


# ---------------------------------------------------------------------------------------------- reporting
def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): the growth exponent (1.0 = linear)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else None


def sweep_row(rec: dict[str, Any]) -> dict[str, Any]:
    """The compact view of one config used by the sweep tables and the plot."""
    mem = rec["memory_bytes"]
    return {
        "config": rec["name"],
        "tokens": rec["tokens"],
        "experts": rec["experts"],
        "groups": rec["groups"],
        "gflop": rec["flops"]["total"] / 1e9,
        "fused_s": rec["time_s"]["fused"]["median_s"],
        "naive_s": rec["time_s"]["naive"]["median_s"],
        "fused_best_s": rec["best"]["fused_s"],
        "naive_best_s": rec["best"]["naive_s"],
        "flop_bound_s": rec["flop_bound_s"],
        "layer_gemms_s": rec["layer_gemms_s"],
        "speedup": rec["speedup"],
        "fused_vs_flop_bound": rec["fused_vs_flop_bound"],
        "fused_peak_mib": mem["fused"]["peak_extra"] / MIB,
        "naive_peak_mib": mem["naive"]["peak_extra"] / MIB,
        "memory_ratio": rec["memory_ratio"],
    }


def make_sweep(axis: str, recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = [sweep_row(r) for r in recs]
    xs = [row[axis] for row in rows]
    return {
        "axis": axis,
        "rows": rows,
        "growth_exponent": {
            "fused": _slope(xs, [row["fused_s"] for row in rows]),
            "naive": _slope(xs, [row["naive_s"] for row in rows]),
            "flop_bound": _slope(xs, [row["flop_bound_s"] for row in rows]),
            "layer_gemms": _slope(xs, [row["layer_gemms_s"] for row in rows]),
        },
    }


def format_sweep(sweep: dict[str, Any]) -> str:
    axis = sweep["axis"]
    lines = [
        f"{axis:>8} {'GFLOP':>7} {'fused ms':>9} {'naive ms':>9} {'bound ms':>9} {'GEMMs ms':>9} {'speedup':>8} "
        f"{'vs bound':>9} {'fused MiB':>10} {'naive MiB':>10} {'mem ratio':>10}"
    ]
    for row in sweep["rows"]:
        lines.append(
            f"{row[axis]:>8} {row['gflop']:>7.2f} {row['fused_s'] * 1e3:>9.1f} {row['naive_s'] * 1e3:>9.1f} "
            f"{row['flop_bound_s'] * 1e3:>9.1f} {row['layer_gemms_s'] * 1e3:>9.1f} {row['speedup']:>8.2f} {row['fused_vs_flop_bound']:>9.2f} "
            f"{row['fused_peak_mib']:>10.1f} {row['naive_peak_mib']:>10.1f} {row['memory_ratio']:>10.3f}"
        )
    gx = sweep["growth_exponent"]
    if gx["fused"] is not None:
        lines.append(
            f"growth exponent in {axis}: fused {gx['fused']:.2f}, naive {gx['naive']:.2f}, "
            f"FLOP bound {gx['flop_bound']:.2f}"
        )
    return "\n".join(lines)


def plot_sweeps(sweeps: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Log-log plot: time (top) and extra peak memory (bottom) against tokens, experts and groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [a for a in ("tokens", "experts", "groups") if a in sweeps]
    fig, axes = plt.subplots(2, len(axes_names), figsize=(4.3 * len(axes_names), 7.5), squeeze=False)
    for col, axis in enumerate(axes_names):
        rows = sweeps[axis]["rows"]
        xs = [row[axis] for row in rows]
        top, bottom = axes[0][col], axes[1][col]
        for key, color, marker, label in (
            ("naive", "tab:red", "s-", "paper loop"),
            ("fused", "tab:blue", "o-", "fused"),
        ):
            top.loglog(xs, [row[f"{key}_s"] for row in rows], marker, color=color, label=f"{label} (median)")
            # shaded down to the best repeat: how much the shared machine's load moved the samples
            top.fill_between(
                xs,
                [row[f"{key}_best_s"] for row in rows],
                [row[f"{key}_s"] for row in rows],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        top.loglog(xs, [row["layer_gemms_s"] for row in rows], ":", color="black", label="its GEMMs alone")
        top.loglog(xs, [row["flop_bound_s"] for row in rows], "--", color="gray", label="FLOPs / GEMM rate")
        bottom.loglog(xs, [row["naive_peak_mib"] for row in rows], "s-", color="tab:red", label="paper loop")
        bottom.loglog(xs, [row["fused_peak_mib"] for row in rows], "o-", color="tab:blue", label="fused")
        for ax in (top, bottom):
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in xs])
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
        top.set_title(f"vs {axis}")
        top.set_ylabel("forward+backward time (s)")
        bottom.set_ylabel("extra peak memory (MiB)")
        bottom.set_xlabel(axis)
        if col == 0:
            top.legend(fontsize=8)
            bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_line(result: dict[str, Any]) -> str:
    """The contract line printed last: ``fused_vs_naive_speedup=<x> memory_ratio=<y>``."""
    s = result["summary"]
    return f"fused_vs_naive_speedup={s['fused_vs_naive_speedup']:.2f} memory_ratio={s['memory_ratio']:.2f}"


# ---------------------------------------------------------------------------------------------- driver
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="main scalar config only, few repeats (< 1 min on 2 CPU cores)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 is for GPUs")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per config (default 5, quick 3)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path; a full run writes a .png beside it (default results/{DEFAULT_OUT.name}, "
        f"with --quick results/{DEFAULT_QUICK_OUT.name})",
    )
    g = p.add_argument_group("shape of the main config (defaults: LLaMA-7B projection, the paper's r and E)")
    g.add_argument("--d", type=int, default=4096, help="in = out features")
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--experts", type=int, default=16)
    g.add_argument("--tokens", type=int, default=2048)
    g.add_argument("--spectral-matrices", type=int, default=512, help="512 = LLaMA-7B block FFN, 32 x 16")
    p.add_argument(
        "--no-allocator-variants",
        "--no-malloc-variant",
        dest="allocator_variants",
        action="store_false",
        help="full CPU runs also time the main config under the other ALLOCATOR_VARIANTS (4 KiB pages, huge "
        "pages, glibc buffer reuse), each in a subprocess; this skips them",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def current_allocator_env() -> dict[str, str]:
    """This process's values of the variables the allocator variants set (``ALLOCATOR_DEFAULTS`` where unset)."""
    return {k: os.environ.get(k, default) for k, default in ALLOCATOR_DEFAULTS.items()}


def allocator_variant(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """The main config again (``--quick``) in a child process under ``ALLOCATOR_VARIANTS[name]``.

    * ``4k_pages``: default 4 KiB pages; every fresh 32 MiB tensor is ``mmap``'d by glibc and page-faulted in
      page by page, then ``munmap``'d when freed.
    * ``huge_pages``: PyTorch madvises allocations >= 2 MiB as 2 MiB transparent huge pages, so the same
      tensor takes 16 faults instead of 8192.
    * ``glibc_buffer_reuse``: 4 KiB pages, but glibc keeps freed buffers and hands them out again, so the
      child's times are (almost) free of allocation cost -- for the paper loop as well.
    """
    import subprocess
    import tempfile

    env = ALLOCATOR_VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variant.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--quick", "--out", str(out), "--device", "cpu"]
        cmd += ["--dtype", args.dtype, "--d", str(args.d), "--rank", str(args.rank)]
        cmd += ["--experts", str(args.experts), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
        child_env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_DEFAULTS}
        proc = subprocess.run(cmd, env={**child_env, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"allocator variant {name!r} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads(out.read_text(encoding="utf-8"))["summary"]
    log(
        f"main config, {name} ({' '.join(f'{k}={v}' for k, v in env.items())}): "
        f"fused {summary['fused_s'] * 1e3:.1f} ms = {summary['fused_vs_flop_bound']:.2f}x bound, "
        f"paper loop {summary['naive_s'] * 1e3:.1f} ms (x{summary['fused_vs_naive_speedup']:.2f})"
    )
    return {"env": env, "summary": summary}


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark described by ``args``, write the JSON (and PNG) and return the result."""
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    started = time.perf_counter()
    machine = machine_info(device)  # now, so that its load average is the one at the start
    main = Shape(args.d, args.rank, args.experts, 1, args.tokens)
    probe = (main.tokens, main.experts * main.r, main.d)
    sweep_reps = max(1, min(args.repeats, 3))
    cache: dict[Shape, dict[str, Any]] = {}

    def measure(shape: Shape, repeats: int) -> dict[str, Any]:
        if shape not in cache:
            cache[shape] = bench_config(
                shape, probe=probe, device=device, dtype=dtype, repeats=repeats, log=log
            )
        return cache[shape]

    log(
        f"layer_speed: device={device} dtype={args.dtype} threads={torch.get_num_threads()} quick={args.quick} "
        f"{THP_ENV}={os.environ.get(THP_ENV)} (kernel THP: {machine.get('kernel_transparent_hugepage')})"
    )
    log("main configs (d, r, E, tokens fixed; scalar routing and FGR):")
    groups = (1,) if args.quick else tuple(g for g in GROUP_SWEEP if args.d % g == 0)
    main_recs = [measure(Shape(main.d, main.r, main.experts, g, main.tokens), args.repeats) for g in groups]
    sweeps: dict[str, dict[str, Any]] = {}
    spectral: dict[str, Any] | None = None
    if not args.quick:
        log("sweep over tokens (scalar routing):")
        tok = sorted({max(1, int(main.tokens * f)) for f in TOKEN_FACTORS})
        sweeps["tokens"] = make_sweep(
            "tokens", [measure(Shape(main.d, main.r, main.experts, 1, n), sweep_reps) for n in tok]
        )
        log("sweep over experts (scalar routing):")
        sweeps["experts"] = make_sweep(
            "experts", [measure(Shape(main.d, main.r, e, 1, main.tokens), sweep_reps) for e in EXPERT_SWEEP]
        )
        sweeps["groups"] = make_sweep("groups", main_recs)
        log(f"spectral regularizer: {args.spectral_matrices} matrices of {main.d} x {main.r}")
        spectral = bench_spectral(
            args.spectral_matrices, main.d, main.r, device=device, dtype=dtype, repeats=sweep_reps
        )
    variants: dict[str, Any] = {}
    if not args.quick and args.allocator_variants and device.type == "cpu":
        mine = current_allocator_env()
        for name, env in ALLOCATOR_VARIANTS.items():
            if mine != {**ALLOCATOR_DEFAULTS, **env}:  # this process doesn't already run under it
                variants[name] = allocator_variant(name, args, log)

    kernel_thp = machine.get("kernel_transparent_hugepage")
    # huge pages need both torch's switch and a kernel that grants madvise'd regions ("never" ignores it)
    huge_pages = None if HUGE_PAGES is None else (HUGE_PAGES and kernel_thp in ("madvise", "always"))
    head = main_recs[0]
    summary = {
        "config": head["name"],
        "huge_pages": huge_pages,
        "fused_vs_naive_speedup": head["speedup"],
        "memory_ratio": head["memory_ratio"],
        "fused_vs_flop_bound": head["fused_vs_flop_bound"],
        "fused_s": head["time_s"]["fused"]["median_s"],
        "naive_s": head["time_s"]["naive"]["median_s"],
        "flop_bound_s": head["flop_bound_s"],
        "gemm_gflops": head["gemm_probe"]["gflops"],
        "layer_gemms_s": head["layer_gemms_s"],
        "fused_vs_layer_gemms": head["fused_vs_layer_gemms"],
        "output_alloc_s": head["output_alloc_s"],
        "fused_vs_flop_bound_plus_output_alloc": head["fused_vs_flop_bound_plus_output_alloc"],
        "best_of_repeats": head["best"],
        "targets": TARGETS,
        "targets_met": {
            "speedup": head["speedup"] >= TARGETS["speedup_min"],
            "memory_ratio": head["memory_ratio"] <= TARGETS["memory_ratio_max"],
            "flop_bound": head["fused_vs_flop_bound"] <= TARGETS["flop_bound_ratio_max"],
        },
    }
    result: dict[str, Any] = {
        "benchmark": "layer_speed",
        "schema_version": 1,
        "quick": bool(args.quick),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "sweep_repeats": sweep_reps,
        "machine": machine,
        "method": {
            "timing": "wall clock of forward+backward (x requires grad, dropout off), one warm-up run (the "
            "agreement check), then the median of the config's `repeats` runs (at least --repeats; configs "
            "whose check took under SAMPLE_BUDGET_S get more, up to MAX_REPEATS); fused, naive, the layer's "
            "GEMMs and the GEMM-rate probe interleaved round-robin in one process; default torch thread count",
            "memory": "extra peak = highest running total of allocator bytes above the level at the start of "
            "one forward+backward (CPU: allocation events from torch.profiler profile_memory; CUDA: "
            "max_memory_allocated); includes the output, temporaries and gradients, excludes inputs and "
            "parameters. saved_for_backward = bytes of distinct storages saved by autograd (saved_tensors_hooks), "
            "inputs/parameters excluded",
            "flops": layer_flops.__doc__.split("\n\n")[0].strip() + " " + head["flops"]["formula"],
            "flop_bound": "flops.total / GEMM rate; GEMM rate = torch.matmul (N, E*r) @ (E*r, d) with out= "
            "(no allocation) at the main config's shape, measured interleaved with each config. layer_gemms_s = "
            "the layer's own six fwd+bwd GEMMs at their real shapes (outputs preallocated; A and the router share "
            "one GEMM), same FLOPs. output_alloc_s = creating, writing and freeing the two (N, d) tensors every "
            "implementation returns (y and dL/dx); fused_vs_flop_bound_plus_output_alloc is a diagnostic",
            "naive": "paper code's per-expert loop (A once; per expert out_e = B_e(h) of shape (N, d_out), "
            "y += w_e * out_e * scaling, w_e repeat_interleave'd to d_out under FGR) on the same tensors",
            "allocation": "run as a script on CPU, THP_MEM_ALLOC_ENABLE=1 unless the environment sets it: PyTorch "
            "madvises allocations >= 2 MiB as 2 MiB transparent huge pages (see `allocator`). Full CPU runs "
            "repeat the main config (quick) under the other ALLOCATOR_VARIANTS in child processes "
            "(`allocator_variants`)",
        },
        "summary": summary,
        "allocator": {
            "huge_pages": huge_pages,
            THP_ENV: os.environ.get(THP_ENV),
            "kernel_transparent_hugepage": kernel_thp,
        },
        "allocator_variants": variants,
        "configs": list(cache.values()),
        "sweeps": sweeps,
        "spectral": spectral,
        "plot": None,
        "elapsed_s": None,
    }
    out = Path(args.out)
    if sweeps:
        png = plot_sweeps(
            sweeps,
            out.with_suffix(".png"),
            f"MultiExpertLoRA fused vs paper per-expert loop (d={main.d}, r={main.r}; E={main.experts}, "
            f"N={main.tokens} unless swept; {args.dtype}, {device}, {torch.get_num_threads()} threads)",
        )
        result["plot"] = png.name
    for axis, sweep in sweeps.items():
        log(f"\n{axis} sweep (d={main.d}, r={main.r}):\n{format_sweep(sweep)}")
    if spectral is not None:
        log(f"\nspectral regularizer, {spectral['matrices']} matrices of {main.d} x {main.r} (median s):")
        for name, t in spectral["time_s"].items():
            log(f"  {name:<26} {t['median_s'] * 1e3:10.2f} ms")
        log(
            f"  spectral mode per step, refresh amortized over {SPECTRAL_REFRESH_STEPS}: "
            f"{spectral['spectral_mode_amortized_per_step_s'] * 1e3:.2f} ms"
        )
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        result["load_average_at_end_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    write_json(out, result)
    met = summary["targets_met"]
    log(
        f"\nmain config {head['name']}: fused {summary['fused_s'] * 1e3:.1f} ms, naive {summary['naive_s'] * 1e3:.1f} ms, "
        f"FLOP bound {summary['flop_bound_s'] * 1e3:.1f} ms (fused = {summary['fused_vs_flop_bound']:.2f}x bound, "
        f"GEMM {summary['gemm_gflops']:.0f} GFLOP/s; {summary['fused_vs_flop_bound_plus_output_alloc']:.2f}x bound + "
        f"y/dx allocation {summary['output_alloc_s'] * 1e3:.1f} ms); targets met: {met}; wrote {out} in {result['elapsed_s']}s"
    )
    best = head["best"]
    log(
        f"best of repeats: fused {best['fused_s'] * 1e3:.1f} ms, naive {best['naive_s'] * 1e3:.1f} ms "
        f"(x{best['speedup']:.2f}), GEMM {best['gemm_gflops']:.0f} GFLOP/s, bound {best['flop_bound_s'] * 1e3:.1f} ms "
        f"(fused = {best['fused_vs_flop_bound']:.2f}x bound)"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
