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


def _closed_form(model) -> torch.Tensor:
    """Σ_k w_k⁴ (σ_k² − s²)² of the *current* B's, averaged over matrices (float64, from a fresh SVD)."""
    total = []
    for _, a, e in expert_matrices(model):
        B = a.expert_B(e).detach().double()
        sv = torch.linalg.svdvals(B)
        w = torch.exp(-sv / (sv.mean() + 1e-8))
        s2 = (B**2).sum() / B.shape[1]
        total.append((w**4 * (sv**2 - s2) ** 2).sum())
    return torch.stack(total).mean()


def test_spectral_mode_is_the_closed_form_of_the_current_b() -> None:
    """Default mode: W from the current B at every application, so the term is Σ w⁴(σ²−s²)² of *this* B."""
    model = _spectral_model("spectral")
    reg = SpectralRegularizer(model.mtlora_config)
    for step in range(4):
        got = reg(model, global_step=step)
        torch.testing.assert_close(got.double(), 0.5 * _closed_form(model), rtol=1e-4, atol=1e-7)
        assert got.requires_grad
        with torch.no_grad():  # B changes between steps (as after an optimizer step): no stale weights
            for a in model.adapters():
                a.lora_B.mul_(1.3).add_(torch.randn_like(a.lora_B), alpha=0.2)
    assert reg.num_weight_computations == 4 * len(expert_matrices(model))  # one eigh per matrix and step


def test_spectral_term_at_the_first_step_after_b_becomes_nonzero() -> None:
    """Step 0: every B is zero (term 0, no gradient). After one real optimizer step B ≠ 0, and the term at step 1
    is the closed form of that B - not the uniform term of a W cached from the all-zero B (issue 12 item 2)."""
    cfg = MtLoraConfig(
        method="mtlora", lora_rank=4, lora_nums=3, lora_dropout=0.0, enable_spectral_reg=True,
        spectral_reg_lambda=0.5, spectral_reg_steps=500,  # the BBH scripts' value: no effect in this mode
    )  # fmt: skip
    model = get_mtlora_model(tiny_model("llama"), cfg)
    model.train()
    assert all(torch.count_nonzero(a.lora_B) == 0 for a in model.adapters())
    reg = SpectralRegularizer(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(3, 128, (2, 9))
    spec0 = reg(model, global_step=0)
    assert float(spec0.detach()) == 0.0
    (model(input_ids=ids, labels=ids).loss + spec0).backward()
    opt.step()
    assert all(torch.count_nonzero(a.lora_B) > 0 for a in model.adapters())
    got = reg(model, global_step=1)
    torch.testing.assert_close(got.double(), 0.5 * _closed_form(model), rtol=1e-4, atol=1e-12)
    # the uniform term of the same B (what a W cached at step 0 gave) is a different number
    uniform = SpectralRegularizer(
        MtLoraConfig(method="mtlora", lora_rank=4, lora_nums=3, enable_spectral_reg=True,
                     spectral_reg_lambda=0.5, spectral_reg_mode="uniform")
    )  # fmt: skip
    assert not torch.isclose(uniform(model, global_step=1), got, rtol=1e-2)


def test_spectral_reg_steps_has_no_effect_in_spectral_mode_and_says_so() -> None:
    plain = _spectral_model("spectral")
    with_steps = _spectral_model("spectral", spectral_reg_steps=3)
    reg_plain = SpectralRegularizer(plain.mtlora_config)
    reg_steps = SpectralRegularizer(with_steps.mtlora_config)
    assert reg_plain.notes() == []
    (note,) = reg_steps.notes()
    assert "--spectral_reg_steps 3 has no effect" in note and "--spectral_reg_mode paper" in note
    for step in range(5):
        assert torch.equal(reg_plain(plain, global_step=step), reg_steps(with_steps, global_step=step))


def test_refresh_opt_in_caches_weights_but_never_from_a_zero_b() -> None:
    cfg = MtLoraConfig(
        method="mtlora", lora_rank=4, lora_nums=3, enable_spectral_reg=True, spectral_reg_lambda=0.5,
        spectral_reg_refresh_steps=5,
    )  # fmt: skip
    model = get_mtlora_model(tiny_model("llama"), cfg)
    n_mod, n_mat = len(list(model.adapters())), len(expert_matrices(model))
    reg = SpectralRegularizer(cfg)
    assert reg.has_schedule_state
    reg(model, global_step=0)  # all B zero: weights computed for this call only, nothing cached
    reg(model, global_step=0)
    assert reg._weights == {} and reg.num_weight_computations == 2 * n_mat
    torch.manual_seed(5)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.3)
    got = reg(model, global_step=1)  # first application with B ≠ 0: fresh weights, cached from now on
    torch.testing.assert_close(got.double(), 0.5 * _closed_form(model), rtol=1e-4, atol=1e-7)
    assert len(reg._weights) == n_mod and reg.num_weight_computations == 3 * n_mat
    cached = {k: v.clone() for k, v in reg._weights.items()}
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.mul_(1.5).add_(0.1)
    reg(model, global_step=4)  # before the refresh (clock started at step 0): cached W, stale by design
    assert reg.num_weight_computations == 3 * n_mat
    assert all(torch.equal(cached[k], reg._weights[k]) for k in cached)
    got = reg(model, global_step=5)  # refresh due: the current B again
    torch.testing.assert_close(got.double(), 0.5 * _closed_form(model), rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(cached[k], reg._weights[k]) for k in cached)


@pytest.mark.parametrize(
    ("field", "value", "mode", "match"),
    [
        ("spectral_reg_refresh_steps", 0, "spectral", ">= 1"),
        ("spectral_reg_refresh_steps", 10, "paper", "only applies to --spectral_reg_mode spectral"),
        ("spectral_reg_refresh_steps", 10, "uniform", "only applies to --spectral_reg_mode spectral"),
    ],
)
def test_refresh_steps_validation(field: str, value: int, mode: str, match: str) -> None:
    with pytest.raises(MtLoraError, match=f"{field}=.*{match}"):
        MtLoraConfig(method="mtlora", enable_spectral_reg=True, spectral_reg_mode=mode, **{field: value})


@pytest.mark.parametrize("mode", ["paper", "spectral_refresh"])
def test_regularizer_state_round_trips_through_a_file(mode: str, tmp_path) -> None:
    """A regularizer restored from its saved state continues exactly like the original (no pickle involved)."""
    kw = {"spectral_reg_steps": 3} if mode == "paper" else {"spectral_reg_refresh_steps": 4}
    model = _spectral_model("paper" if mode == "paper" else "spectral", **kw)
    reg = SpectralRegularizer(model.mtlora_config)
    for step in range(3):
        reg(model, global_step=step)
    path = tmp_path / "spectral_state.safetensors"
    reg.save(path)
    restored = SpectralRegularizer(model.mtlora_config)
    restored.load(path)
    assert restored.state_dict().keys() == reg.state_dict().keys()
    fresh = SpectralRegularizer(model.mtlora_config)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.mul_(1.2).add_(0.05)
    a, b, c = (r(model, global_step=3) for r in (reg, restored, fresh))
    if mode == "paper":  # fired at step 2: not again before 5; a fresh regularizer fires at once
        assert a is None and b is None and c is not None
    else:  # cached weights from step 0 (refresh at 4); a fresh one recomputes from the current B
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert restored.num_applications == reg.num_applications


def test_regularizer_state_file_errors(tmp_path) -> None:
    model = _spectral_model("paper", spectral_reg_steps=3)
    reg = SpectralRegularizer(model.mtlora_config)
    path = tmp_path / "spectral_state.safetensors"
    reg.save(path)
    other = SpectralRegularizer(_spectral_model("spectral").mtlora_config)
    with pytest.raises(MtLoraError, match="saved by --spectral_reg_mode paper, this run uses spectral"):
        other.load(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(MtLoraError, match="bad.safetensors: cannot read"):
        reg.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(MtLoraError, match="not a spectral regularizer state"):
        reg.load(bad)


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
