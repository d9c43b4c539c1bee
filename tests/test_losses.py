"""Balance loss (with gradient checkpointing) and the spectral regularizer (paper and spectral modes)."""

from __future__ import annotations

import random

import pytest
import torch
from _tiny import tiny_model

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.errors import MtLoraError
from mtlora.losses import SpectralRegularizer, expert_matrices, spectral_term, spectral_weights


def _blc_model(**kw):
    cfg = MtLoraConfig(
        method="mtlora", lora_rank=4, lora_nums=4, lora_dropout=0.0, enable_blc=True, blc_alpha=0.5, **kw
    )
    model = get_mtlora_model(tiny_model("llama"), cfg)
    torch.manual_seed(3)
    for a in model.adapters():
        torch.nn.init.normal_(a.lora_B, std=0.2)
    model.train()
    return model


def _router_grads(model, ids, mask, **gc):
    model.zero_grad(set_to_none=True)
    if gc:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.balance_loss is not None
    # only the balance loss: no labels, so the router gradient comes from it alone
    out["balance_loss_with_grad"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}


@pytest.mark.parametrize("placement", ["component", "block"])
def test_balance_loss_has_gradient_with_checkpointing(placement: str) -> None:
    kw = {"enable_block_adapter": True} if placement == "block" else {}
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    plain = _router_grads(_blc_model(**kw), ids, mask)
    assert all(torch.count_nonzero(g) > 0 for g in plain.values())
    model = _blc_model(**kw)
    ckpt = _router_grads(model, ids, mask, use_reentrant=False)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)
    # the wrapper's own switch is non-reentrant too, and refuses the reentrant variant
    model.gradient_checkpointing_enable()
    with pytest.raises(MtLoraError, match="reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_reentrant_checkpointing_is_an_error_not_a_silent_noop() -> None:
    model = _blc_model()
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(3, 128, (2, 7))
    with pytest.raises(MtLoraError, match="balance loss has no gradient"):
        model(input_ids=ids, labels=ids)


def test_balance_loss_in_model_loss_and_padding() -> None:
    model = _blc_model()
    ids = torch.randint(3, 128, (2, 7))
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, out.task_loss + 0.5 * out.balance_loss)
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    with_pad = model(input_ids=ids, attention_mask=mask).balance_loss
    model.mtlora_config.blc_ignore_padding = False  # the paper: padding positions count too
    paper = model(input_ids=ids, attention_mask=mask).balance_loss
    assert not torch.isclose(with_pad, paper)
    model.eval()
    assert model(input_ids=ids, labels=ids).get("balance_loss") is None  # training-only, like the paper


# ----------------------------------------------------------------------------- spectral regularizer
def _spectral_model(mode: str, **kw):
    cfg = MtLoraConfig(
        method="mtlora",
        lora_rank=4,
        lora_nums=20,
        enable_spectral_reg=True,
        spectral_reg_lambda=0.5,
        spectral_reg_mode=mode,
        **kw,
    )
    model = get_mtlora_model(tiny_model("llama"), cfg)
    torch.manual_seed(4)
    for a in model.adapters():
        torch.nn.init.normal_(a.lora_B, std=0.3)
    return model


def _paper_reference(model, global_step: int) -> torch.Tensor:
    """A literal transcription of the released trainer's compute_spectral_regularization."""
    all_b = [a.expert_B(e) for _, a, e in expert_matrices(model)]
    if len(all_b) > 64:
        random.seed(global_step)
        all_b = random.sample(all_b, 64)
    total = 0.0
    for B in all_b:
        gram = B.T @ B
        r = gram.shape[0]
        with torch.no_grad():
            sv = torch.linalg.svdvals(B.float())
            w = torch.exp(-sv / (sv.mean() + 1e-8))
            s = (B.norm() / r**0.5 + 1e-8).item()
        D = gram - (s**2) * torch.eye(r)
        loss_b = 0.0
        for j in range(r):
            for k in range(r):
                loss_b = loss_b + (w[j] * w[k] * D[j, k]) ** 2
        total = total + loss_b
    return total / len(all_b)


def test_paper_mode_matches_released_formula_and_sampling() -> None:
    model = _spectral_model("paper", spectral_reg_steps=3)
    assert len(expert_matrices(model)) == 80  # > 64: sampling kicks in
    reg = SpectralRegularizer(model.mtlora_config)
    state = random.getstate()
    got = reg(model, global_step=2)
    assert random.getstate() == state  # no reseeding of the global RNG (the paper's side effect)
    expected = 0.5 * _paper_reference(model, 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(got, [a.lora_B for a in model.adapters()])
    assert sum(int(torch.count_nonzero(g)) for g in grads) > 0


def test_paper_mode_trigger_schedule() -> None:
    model = _spectral_model("paper", spectral_reg_steps=3)
    reg = SpectralRegularizer(model.mtlora_config)
    fired = []
    for step in range(9):
        for micro in range(2):  # two micro-batches per optimizer step: only the first one triggers
            if reg(model, global_step=step) is not None:
                fired.append((step, micro))
    assert fired == [(2, 0), (5, 0), (8, 0)]
    # epoch mode (no steps): fires at step 0 of each epoch, where B=0 at init makes it a no-op
    cfg = MtLoraConfig(
        method="mtlora", lora_rank=4, lora_nums=2, enable_spectral_reg=True, spectral_reg_mode="paper"
    )
    fresh = get_mtlora_model(tiny_model("llama"), cfg)
    reg = SpectralRegularizer(cfg)
    loss0 = reg(fresh, global_step=0, epoch=0.0)
    assert loss0 is not None and reg(fresh, global_step=1, epoch=0.5) is None
    g = torch.autograd.grad(loss0, [a.lora_B for a in fresh.adapters()])
    assert all(torch.count_nonzero(x) == 0 for x in g)
    assert reg(fresh, global_step=10, epoch=1.0) is not None


def test_spectral_mode_is_weighted_singular_value_penalty() -> None:
    model = _spectral_model("spectral", spectral_reg_steps=5)
    reg = SpectralRegularizer(model.mtlora_config)
    got = reg(model, global_step=0)
    expected = 0.0
    mats = expert_matrices(model)
    for _, a, e in mats:
        B = a.expert_B(e).detach().double()
        sv = torch.linalg.svdvals(B)
        w = torch.exp(-sv / (sv.mean() + 1e-8))
        s2 = (B**2).sum() / B.shape[1]
        expected += float((w**4 * (sv**2 - s2) ** 2).sum())
    torch.testing.assert_close(
        got.double(), torch.tensor(0.5 * expected / len(mats), dtype=torch.double), rtol=1e-4, atol=1e-7
    )
    assert got.requires_grad
    # applies on every call; weights refreshed only every spectral_reg_steps
    assert reg(model, global_step=0) is not None and reg(model, global_step=1) is not None
    cached = {k: v.clone() for k, v in reg._weights.items()}
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.mul_(1.5).add_(0.1)
    reg(model, global_step=3)
    assert all(torch.equal(cached[k], reg._weights[k]) for k in cached)
    reg(model, global_step=5)
    assert any(not torch.equal(cached[k], reg._weights[k]) for k in cached)


def test_spectral_weights_protect_high_singular_values() -> None:
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(32, 4))
    B = U @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5]))
    B.requires_grad_(True)
    W = spectral_weights(B.detach())
    spectral_term(B, W).backward()
    # gradient along each singular direction: the strongest direction gets the smallest push
    per_dir = (U.T @ B.grad).norm(dim=1)
    w = torch.exp(-torch.tensor([4.0, 2.0, 1.0, 0.5]) / 1.875)
    assert per_dir[0] / 4.0 < per_dir[3] / 0.5
    assert torch.all(w[:-1] < w[1:])


def test_uniform_mode_is_the_unweighted_orthogonality_term() -> None:
    """mode="uniform": w = 1, so L_B = ||B^T B - s^2 I||_F^2 with s^2 = ||B||_F^2 / r, on every step."""
    model = _spectral_model("uniform")
    reg = SpectralRegularizer(model.mtlora_config)
    expected = []
    for _, a, e in expert_matrices(model):
        B = a.expert_B(e).detach()
        r = B.shape[1]
        D = B.T @ B - (B.norm() ** 2 / r) * torch.eye(r)
        expected.append((D**2).sum())
    want = 0.5 * torch.stack(expected).mean()
    for step in (0, 1, 7):  # applied on every micro-batch, no schedule
        got = reg(model, global_step=step)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got.backward()
    assert all(a.lora_B.grad is not None and torch.count_nonzero(a.lora_B.grad) for a in model.adapters())
