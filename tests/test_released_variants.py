"""The released code's other variants (issue 13, issue 12 item 6): adaptformer block style, MMoELoRA's
"general" task id (``mmoeloras``), ``modules_to_save``, and their configuration rules and parameter counts."""

from __future__ import annotations

import re

import pytest
import torch
from _reference import ReleasedAdaptFormerBlockAdapter, naive_forward
from _tiny import REPO, tiny_model
from safetensors.torch import load_file

from mtlora.cli import main as cli_main
from mtlora.config import MtLoraConfig
from mtlora.errors import ConfigError, MtLoraError, PlacementError
from mtlora.layers import MultiExpertLoRA, RoutingState
from mtlora.model import MtLoraModel, get_mtlora_model

L7 = str(REPO / "tests" / "fixtures" / "llama-2-7b")

ADAPTFORMER = {
    "scalar": dict(num_experts=4, router="token"),
    "fgr_g4": dict(num_experts=3, router="token", num_groups=4),
    "single": dict(num_experts=1, router="none"),
}


def _adaptformer(case: str, init_scale: float = 0.0, seed: int = 0) -> MultiExpertLoRA:
    torch.manual_seed(seed)
    m = MultiExpertLoRA(
        16, 16, 4, scaling=4.0, style="adaptformer", adaptformer_init_scale=init_scale, **ADAPTFORMER[case]
    )
    with torch.no_grad():  # trained-looking weights: B and the scales away from their (zero) init
        m.lora_B.normal_(std=0.3)
        m.expert_scales.uniform_(-1.5, 1.5)
    return m


@pytest.mark.parametrize("case", list(ADAPTFORMER))
def test_adaptformer_equals_the_released_module(case: str) -> None:
    """Same weights into our fused layer and the released module (re-implemented from the spec): equal
    outputs, gradients and balance loss."""
    ours = _adaptformer(case)
    ref = ReleasedAdaptFormerBlockAdapter(
        16,
        4,
        ours.num_experts,
        enable_fine_grained_routing=ours.num_groups > 1,
        routing_group_size=16 // ours.num_groups,
    ).load_from(ours)
    x = torch.randn(3, 5, 16)
    ours.state = RoutingState(collect_balance=True)
    ours.train(), ref.train()
    y_ours, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y_ours, naive_forward(ours, x), atol=1e-6, rtol=1e-5)
    assert ours.scaling == 1.0  # no alpha/r in this style, whatever scaling was passed
    if ours.num_experts > 1:
        torch.testing.assert_close(ours.state.balance_terms[0], ref.last_blc, atol=1e-7, rtol=1e-5)
    g = torch.randn_like(y_ours)
    (y_ours * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, ref.lora_A.weight.grad, atol=1e-5, rtol=1e-5)
    for i in range(ours.num_experts):
        torch.testing.assert_close(ours.lora_B.grad[:, i, :], ref.lora_B[i].weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.expert_scales.grad[i : i + 1], ref.expert_scales[i].grad, atol=1e-5, rtol=1e-5
        )
    if ref.lora_route is not None:
        torch.testing.assert_close(ours.router.weight.grad, ref.lora_route.weight.grad, atol=1e-5, rtol=1e-5)


def test_adaptformer_init_released_zero_is_a_dead_saddle_our_default_trains() -> None:
    """Released default init_scale=0 with B=0: every gradient is exactly zero (spec Appendix B.4). Ours (0.1)
    still starts at the base model (zero output) but B receives gradient."""
    x = torch.randn(2, 3, 16)
    for init, alive in ((0.0, False), (0.1, True)):
        torch.manual_seed(0)
        m = MultiExpertLoRA(16, 16, 4, num_experts=4, style="adaptformer", adaptformer_init_scale=init)
        assert torch.equal(m.expert_scales.detach(), torch.full((4,), init))
        y = m(x)
        assert torch.count_nonzero(y) == 0  # adapted model = base model at init
        (m(x) * torch.randn(2, 3, 16)).sum().backward()
        grads = [p.grad for p in m.parameters()]
        nonzero = any(gr is not None and torch.count_nonzero(gr) > 0 for gr in grads)
        assert nonzero is alive, (init, [None if gr is None else float(gr.abs().max()) for gr in grads])
    assert MtLoraConfig().adaptformer_init_scale == 0.1


def test_adaptformer_scales_are_saved_and_reloaded(tmp_path) -> None:
    """The released code dropped expert_scales when saving (no "lora_" in the name); ours are saved."""
    cfg = dict(
        method="mtlora",
        lora_nums=4,
        lora_rank=4,
        enable_block_adapter=True,
        block_adapter_type="both",
        block_adapter_style="adaptformer",
        enable_fine_grained_routing=True,
        routing_group_size=16,
    )
    model = get_mtlora_model(tiny_model(), MtLoraConfig(**cfg))
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.2)
            a.expert_scales.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    scale_keys = [k for k in saved if k.endswith(".expert_scales")]
    assert len(scale_keys) == 4 and all(saved[k].shape == (4,) for k in scale_keys)  # 2 layers x (attn, mlp)
    reloaded = MtLoraModel.from_pretrained(tiny_model(), tmp_path)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
        with reloaded.disable_adapters():
            base = reloaded(input_ids=ids).logits
    assert (reloaded(input_ids=ids).logits - base).abs().max() > 1e-4


def _params(*flags: str, capsys) -> int:
    assert cli_main(["params", "--model_name_or_path", L7, *flags]) == 0
    out = capsys.readouterr().out
    return int(re.search(r"trainable_params=(\d+)", out).group(1))


def test_parameter_counts_of_the_released_variants(capsys) -> None:
    """LLaMA-2-7B on the meta device: adaptformer adds E scalars per block adapter; the general task row adds
    task_embedding_dim per adapted module (q_proj, v_proj: 64 modules)."""
    block = ["--method", "mtlora", "--enable_block_adapter", "--block_adapter_type", "ffn"]
    assert _params(*block, capsys=capsys) == 37_748_736
    assert _params(*block, "--block_adapter_style", "adaptformer", capsys=capsys) == 37_748_736 + 32 * 16
    mmoe = ["--lora_rank", "16", "--task_num", "8", "--expert_num", "4"]
    ours = _params("--method", "mmoelora", *mmoe, capsys=capsys)
    released = _params("--method", "mmoeloras", *mmoe, capsys=capsys)
    assert released - ours == 64 * 64
    # per module: A (16 x 4096) + B (4096 x 16) + embedding (8 or 9 rows x 64) + gate (64 x 4)
    assert ours == 64 * (2 * 16 * 4096 + 8 * 64 + 64 * 4)


def test_mmoeloras_is_mmoelora_with_the_general_task_id() -> None:
    cfg = MtLoraConfig(method="mmoeloras", lora_rank=8, expert_num=4, task_num=3)
    assert cfg.method == "mmoelora" and cfg.mmoelora_general_task
    torch.manual_seed(0)
    general = MultiExpertLoRA(16, 16, 8, 4, router="task", task_num=3, general_task=True)
    plain = MultiExpertLoRA(16, 16, 8, 4, router="task", task_num=3)
    assert general.router.embedding.num_embeddings == 4 and plain.router.embedding.num_embeddings == 3
    assert general.router.general_id == 3 and plain.router.general_id is None
    with torch.no_grad():
        general.lora_B.normal_()
        general.router.embedding.weight.normal_()
    x = torch.randn(2, 5, 16)
    general.state.task_ids = None  # no task id arrives: the general row, as released
    y_none = general(x)
    general.state.task_ids = torch.tensor([3, 3])
    torch.testing.assert_close(y_none, general(x))
    torch.testing.assert_close(y_none, naive_forward(general, x, torch.tensor([3, 3])))
    general.state.task_ids = torch.tensor([0, 2])
    assert (general(x) - y_none).abs().max() > 1e-4
    general.state.task_ids = torch.tensor([4, 0])
    with pytest.raises(MtLoraError, match=r"ids 0\.\.3, 3 = general"):
        general(x)
    plain.state.task_ids = None
    with pytest.raises(MtLoraError, match="routes by task id"):
        plain(x)
    plain.state.task_ids = torch.tensor([3, 0])  # the general id does not exist without the switch
    with pytest.raises(MtLoraError, match="out of range"):
        plain(x)


def test_general_task_through_the_model_and_its_checkpoint(tmp_path) -> None:
    model = get_mtlora_model(
        tiny_model(), MtLoraConfig(method="mmoeloras", lora_rank=4, expert_num=2, task_num=2)
    )
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.2)
            a.router.embedding.weight.normal_()
    ids = torch.tensor([[1, 5, 9, 13]])
    model.eval()
    with torch.no_grad():
        no_id = model(input_ids=ids).logits
        general = model(input_ids=ids, task_ids=torch.tensor([2])).logits
        task0 = model(input_ids=ids, task_ids=torch.tensor([0])).logits
    torch.testing.assert_close(no_id, general)
    assert (task0 - general).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    reloaded = MtLoraModel.from_pretrained(tiny_model(), tmp_path)
    assert reloaded.mtlora_config.mmoelora_general_task
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, no_id)


def test_modules_to_save_trains_saves_and_restores(tmp_path) -> None:
    base = tiny_model()
    original = base.lm_head.weight.detach().clone()
    model = get_mtlora_model(base, MtLoraConfig(method="lora", lora_rank=4, modules_to_save="lm_head"))
    assert base.lm_head.weight.requires_grad and not base.model.embed_tokens.weight.requires_grad
    assert "lm_head.weight" in model.adapter_state_dict()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(base.lm_head.weight, original)  # trained in full
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with model.disable_adapters():  # exactly the base model, lm_head included
            torch.testing.assert_close(model(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)
        torch.testing.assert_close(model(input_ids=ids).logits, trained)  # trained values back after
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    reloaded = MtLoraModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)
    restored = model.unload()
    assert torch.equal(restored.lm_head.weight, original)


def test_modules_to_save_names_a_missing_module() -> None:
    with pytest.raises(PlacementError, match="no module of LlamaForCausalLM is named 'lm_heads'"):
        get_mtlora_model(tiny_model(), MtLoraConfig(method="lora", modules_to_save=["lm_heads"]))


def test_config_rules_of_the_released_variants() -> None:
    with pytest.raises(ConfigError, match="mmoelora_general_task.*method mmoelora only"):
        MtLoraConfig(method="hydralora", mmoelora_general_task=True)
    with pytest.raises(ConfigError, match="enable_blc.*adalora has no experts"):
        MtLoraConfig(method="adalora", enable_blc=True)
    with pytest.raises(ConfigError, match="block_adapter_style.*adaptformer"):
        MtLoraConfig(block_adapter_style="adapterformer")
    assert MtLoraConfig(method="adalora", lora_nums=8).num_experts == 1
    with pytest.raises(MtLoraError, match="adalora is peft's AdaLoRA"):
        get_mtlora_model(tiny_model(), MtLoraConfig(method="adalora"))
    with pytest.raises(MtLoraError, match="not a task gate"):
        MultiExpertLoRA(8, 8, 4, 2, router="task", task_num=2, style="adaptformer")


def test_repro_paper_faithful_builds_the_released_mmoelora_embedding(tmp_path, capsys) -> None:
    """Issue 12 item 6: ``mtlora repro --paper_faithful`` trains MMoELoRA with the task_num + 1 embedding."""
    import shlex

    from mtlora.training.arguments import parse_train_args

    for faithful in (False, True):
        argv = ["repro", "table1", "--dry-run", "--output_dir", str(tmp_path)] + (
            ["--paper_faithful"] * faithful
        )
        assert cli_main(argv) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "train.py" in ln and "mmoelora" in ln]
        assert len(lines) == 2  # BBH and MMLU
        words = shlex.split(lines[0])  # python train.py ... or torchrun --nproc_per_node N train.py ...
        train_argv = [a for a in words[words.index("train.py") + 1 :] if a != "--bf16"]  # CPU
        train_argv[train_argv.index("--model_name_or_path") + 1] = "mtlora:stories260k"
        _, _, adapter, _ = parse_train_args(train_argv, check_paths=False)
        assert adapter.method == "mmoelora" and adapter.mmoelora_general_task is faithful


def test_adaptformer_static_export_matches_the_model(tmp_path) -> None:
    """A static-routing export of an adaptformer block adapter folds s_e into B_t and keeps the ReLU."""
    from mtlora.export import export_block_adapter, load_block_export, static_routing

    cfg = MtLoraConfig(
        method="mtlora",
        lora_nums=3,
        lora_rank=4,
        enable_block_adapter=True,
        block_adapter_type="both",
        block_adapter_style="adaptformer",
        enable_fine_grained_routing=True,
        routing_group_size=32,
    )
    model = get_mtlora_model(tiny_model(), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for a in model.adapters():
            a.lora_B.normal_(std=0.3)
            a.expert_scales.uniform_(0.5, 2.0)
    routing = {
        n: torch.softmax(torch.randn(a.num_groups, a.num_experts), -1) for n, a in model.named_adapters()
    }
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        with static_routing(model, routing, collapse=False):
            fused = model(input_ids=ids).logits
        with static_routing(model, routing, collapse=True):
            collapsed = model(input_ids=ids).logits
    torch.testing.assert_close(collapsed, fused, atol=1e-5, rtol=1e-5)
    export_block_adapter(model, routing, tmp_path)
    plain = tiny_model()
    handles = load_block_export(plain, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, collapsed, atol=1e-5, rtol=1e-5)
    for h in handles:
        h.remove()


def test_exports_refuse_to_drop_modules_to_save(tmp_path) -> None:
    from mtlora.export import export_peft_lora

    model = get_mtlora_model(
        tiny_model(), MtLoraConfig(method="lora", lora_rank=4, modules_to_save=["lm_head"])
    )
    with pytest.raises(
        MtLoraError, match=r"modules_to_save=\['lm_head'\]; a peft LoRA export would drop them"
    ):
        export_peft_lora(model, {}, tmp_path / "peft")
    with torch.no_grad():
        model.base_model.lm_head.weight.add_(1.0)
    trained = model.base_model.lm_head.weight.detach().clone()
    merged = model.merge_and_unload()  # the merged checkpoint keeps the trained module (as peft's does)
    assert torch.equal(merged.lm_head.weight, trained)
