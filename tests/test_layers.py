"""The fused multi-expert layer against the naive per-expert reference: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from _reference import naive_forward

from mtlora.errors import ConfigError, MtLoraError
from mtlora.layers import MultiExpertLoRA, RoutingState, cv_squared
from mtlora.routing import num_groups_for

CASES = {
    "plain_lora": dict(num_experts=1, router="none"),
    "scalar": dict(num_experts=4, router="token"),
    "fgr_g2": dict(num_experts=4, router="token", num_groups=2),
    "fgr_g8": dict(num_experts=3, router="token", num_groups=8),
    "topk": dict(num_experts=4, router="token", num_groups=2, top_k=2),
    "bottleneck": dict(num_experts=4, router="token", style="bottleneck"),
    "task": dict(num_experts=2, router="task", task_num=3),
}


def _layer(case: str, seed: int = 0) -> MultiExpertLoRA:
    torch.manual_seed(seed)
    m = MultiExpertLoRA(24, 32, 4, scaling=2.0, **CASES[case])
    torch.nn.init.normal_(m.lora_B, std=0.5)  # B is zero at init; make every path non-trivial
    return m


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_naive_outputs_and_gradients(case: str) -> None:
    m = _layer(case)
    x = torch.randn(3, 5, 24, requires_grad=True)
    task_ids = torch.tensor([0, 2, 1])
    if m.router_kind == "task":
        m.state.task_ids = task_ids
    y = m(x)
    y_ref = naive_forward(m, x, task_ids)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *m.parameters()], allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert b is not None, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("case", ["scalar", "fgr_g8", "topk", "bottleneck"])
def test_router_in_a_gemm_equals_separate_router_call(case: str) -> None:
    """The [A; W_router] GEMM gives the same outputs and gradients as calling the router module itself."""
    m = _layer(case)
    x = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 32)
    assert m._router_shares_gemm(x.reshape(-1, 24))
    y = m(x)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    seen: list[torch.Tensor] = []
    handle = m.router.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        assert not m._router_shares_gemm(x.reshape(-1, 24))  # an observer must see the router's call
        y_sep = m(x)
        grads_sep = torch.autograd.grad((y_sep * g).sum(), [x, *m.parameters()])
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (15, m.num_groups, m.num_experts)
    torch.testing.assert_close(y, y_sep, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_sep):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_accumulating_into_the_base_output_equals_adding(case: str) -> None:
    """``m(x, base=b)`` (the hooks' call: addmm / one sum) == ``b + m(x)``, outputs and every gradient."""
    m = _layer(case)
    m.state.task_ids = torch.tensor([0, 2, 1])
    x = torch.randn(3, 5, 24, requires_grad=True)
    base = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 32)
    leaves = [x, base, *m.parameters()]
    fused = m(x, base=base)
    assert fused.shape == base.shape and fused.is_contiguous()
    plain = base + m(x)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(
        torch.autograd.grad((fused * g).sum(), leaves), torch.autograd.grad((plain * g).sum(), leaves)
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 base: accumulated in the bf16 GEMM
        out = m(x.bfloat16(), base=base.bfloat16())
        mixed = m(x.bfloat16(), base=base)  # fp32 base, bf16 Delta: the plain sum, fp32 out
    assert out.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    torch.testing.assert_close(out.float(), plain, atol=0.1, rtol=0.05)
    torch.testing.assert_close(mixed, plain, atol=0.1, rtol=0.05)


def test_router_gemm_sharing_conditions() -> None:
    """Shared only when exact: no dropout in training, fp32 outside autocast, no fixed routing."""
    x2 = torch.randn(4, 24)
    m = MultiExpertLoRA(24, 32, 4, 4, router="token", dropout=0.1)
    assert not m._router_shares_gemm(x2)  # dropout acts on A's input, not the router's
    m.eval()
    assert m._router_shares_gemm(x2)
    assert not m._router_shares_gemm(x2.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m._router_shares_gemm(x2)
    m.router.forward = m.router.forward.__func__.__get__(m.router)  # an instance-level forward (accelerate)
    assert not m._router_shares_gemm(x2)
    del m.router.forward
    assert m._router_shares_gemm(x2)
    m.fixed_routing = torch.full((1, 4), 0.25)
    assert not m._router_shares_gemm(x2)
    assert not MultiExpertLoRA(24, 32, 4, 1)._router_shares_gemm(x2)  # no router at all


def test_init_output_is_zero() -> None:
    m = MultiExpertLoRA(16, 16, 4, 4, router="token", num_groups=2)
    assert torch.count_nonzero(m(torch.randn(2, 3, 16))) == 0
    assert torch.count_nonzero(m.lora_A) > 0 and torch.count_nonzero(m.router.weight) > 0


def test_fgr_group_layout_is_group_major_and_contiguous() -> None:
    """Logit j = g*E + e; group g covers output dims [g*gs, (g+1)*gs)."""
    torch.manual_seed(0)
    E, G, d_out = 2, 4, 8
    m = MultiExpertLoRA(6, d_out, 2, E, router="token", num_groups=G)
    with torch.no_grad():
        m.router.weight.zero_()
        m.lora_A.fill_(0.1)
        m.lora_B.zero_()
        m.lora_B[:, 1, :] = 1.0  # only expert 1 produces output
        m.router.weight[2 * E + 1].fill_(100.0)  # group 2 prefers expert 1 strongly for positive inputs
    x = torch.ones(1, 6)
    y = m(x)[0]
    gs = d_out // G
    on = y[2 * gs : 3 * gs]
    off = torch.cat([y[: 2 * gs], y[3 * gs :]])
    torch.testing.assert_close(on, torch.full_like(on, 2 * 0.6))  # weight 1 on expert 1 (h = 0.6 per rank)
    torch.testing.assert_close(off, torch.full_like(off, 0.6))  # uniform: weight 1/2 elsewhere
    probs = m.routing_probs(x, (1,))
    assert probs.shape == (1, G, E)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, G))


def test_group_size_must_divide() -> None:
    with pytest.raises(ConfigError, match="does not divide the output size 4096 of q"):
        num_groups_for(4096, 1000, True, where="q")
    assert num_groups_for(4096, 2048, True) == 2
    assert num_groups_for(4096, None, True) == 2
    assert num_groups_for(4096, 2048, False) == 1


def test_topk_zeroes_other_experts() -> None:
    m = _layer("topk")
    probs = m.routing_probs(torch.randn(7, 24), (7,))
    assert ((probs > 0).sum(-1) == 2).all()


def test_task_router_needs_task_ids_and_expands_for_beams() -> None:
    m = _layer("task")
    with pytest.raises(MtLoraError, match="task_ids"):
        m(torch.randn(2, 3, 24))
    m.state.task_ids = torch.tensor([0, 2])
    y_beams = m(torch.randn(4, 3, 24))  # 2 samples x 2 beams
    assert y_beams.shape == (4, 3, 32)
    m.state.task_ids = torch.tensor([0, 5])
    with pytest.raises(MtLoraError, match="task id out of range"):
        m(torch.randn(2, 3, 24))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_autocast_and_cast(dtype: torch.dtype) -> None:
    m = _layer("fgr_g2")
    x = torch.randn(2, 3, 24)
    ref = m(x)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    y2 = m(x.to(dtype))  # no autocast: computed in the fp32 adapter, cast back
    assert y2.dtype == dtype
    y.float().sum().backward()
    assert m.lora_B.grad is not None and m.lora_B.grad.dtype == torch.float32


def test_balance_terms_and_cv2() -> None:
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.isclose(cv_squared(p), p.var() / p.mean() ** 2)
    assert cv_squared(torch.tensor([1.0])) == 0
    st = RoutingState(collect_balance=True)
    m = MultiExpertLoRA(8, 8, 2, 4, router="token", num_groups=2, state=st)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    st.attention_mask = mask
    m(x)
    probs = m.routing_probs(x.reshape(-1, 8), (2, 5)).mean(1)  # (N, E), mean over groups
    w = mask.reshape(-1, 1).float()
    expected = cv_squared((probs * w).sum(0) / w.sum())
    torch.testing.assert_close(st.balance_terms[0], expected)
    assert st.balance_terms[0].requires_grad
