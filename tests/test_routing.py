"""Router objects (issue 16): the method table, the registry, capabilities, and the layer as one forward."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import tiny_model

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.config import METHOD_SPECS, METHODS
from mtlora.errors import ConfigError, MtLoraError
from mtlora.layers import MultiExpertLoRA
from mtlora.routing import (
    REGISTRY,
    FineGrainedTokenRouter,
    NoRouter,
    Router,
    StaticRouting,
    TaskRouter,
    TokenRouter,
    make_router,
    router_class,
)

CONFIGS = {
    "lora": (dict(method="lora"), NoRouter),
    "hydralora": (dict(method="hydralora", lora_nums=3), TokenRouter),
    "mmoelora": (dict(method="mmoelora", expert_num=2, task_num=3, lora_rank=4), TaskRouter),
    "mmoeloras": (dict(method="mmoeloras", expert_num=2, task_num=3, lora_rank=4), TaskRouter),
    "mtlora": (dict(method="mtlora", lora_nums=3), TokenRouter),
    "mtlora_one_expert": (dict(method="mtlora", lora_nums=1, enable_block_adapter=True), NoRouter),
    "adalora": (dict(method="adalora"), NoRouter),
}


def test_the_method_table_covers_every_method_and_router() -> None:
    assert METHODS == ("lora", "hydralora", "mmoelora", "mtlora", "adalora")
    assert set(METHOD_SPECS) == set(METHODS)
    assert {s.router for s in METHOD_SPECS.values()} == set(REGISTRY) == {"none", "token", "task"}
    assert all(REGISTRY[k].kind == k for k in REGISTRY)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_router_class_and_kind_per_method(name: str) -> None:
    kwargs, cls = CONFIGS[name]
    cfg = MtLoraConfig(**kwargs)
    assert router_class(cfg) is cfg.router_class is cls
    assert cfg.router_kind == cls.kind  # the property the saved signatures and reports use


def test_capabilities_replace_kind_names() -> None:
    flags = {
        c.kind: (c.is_routed, c.needs_task_ids, c.needs_calibration, c.has_balance, c.static_source)
        for c in REGISTRY.values()
    }
    assert flags == {
        "none": (False, False, False, False, "none"),
        "token": (True, False, True, True, "calibration"),
        "task": (True, True, False, False, "task_gate"),
    }


@pytest.mark.parametrize("name", ["lora", "hydralora", "mmoelora", "mtlora"])
def test_model_capabilities_follow_the_router(name: str) -> None:
    kwargs, cls = CONFIGS[name]
    model = get_mtlora_model(tiny_model("llama"), MtLoraConfig(**{**kwargs, "lora_rank": 4}))
    assert model.needs_task_ids is cls.needs_task_ids
    assert model.has_balance_router is cls.has_balance
    assert all(type(a.router) is cls for a in model.adapters())


def test_saved_keys_name_the_router_child_and_no_router_adds_none() -> None:
    """The router is always the child ``router``; the single-expert one has no parameters, so plain LoRA's
    saved keys stay ``lora_A`` / ``lora_B`` only (existing adapters keep loading)."""
    suffixes = {}
    for name in ("lora", "hydralora", "mmoelora"):
        kwargs, _ = CONFIGS[name]
        model = get_mtlora_model(tiny_model("llama"), MtLoraConfig(**{**kwargs, "lora_rank": 4}))
        suffixes[name] = {k.split(".mtlora.", 1)[1] for k in model.adapter_state_dict()}
    assert suffixes == {
        "lora": {"lora_A", "lora_B"},
        "hydralora": {"lora_A", "lora_B", "router.weight"},
        "mmoelora": {"lora_A", "lora_B", "router.embedding.weight", "router.gate.weight"},
    }


def test_make_router_resolves_and_rejects() -> None:
    assert isinstance(make_router("token", in_features=8, num_experts=1), NoRouter)  # one expert: no routing
    assert type(make_router("token", in_features=8, num_experts=3)) is TokenRouter
    fine = make_router("token", in_features=8, num_experts=3, num_groups=2)
    assert type(fine) is FineGrainedTokenRouter and fine.kind == "token"
    assert type(TokenRouter(8, 3, 2)) is FineGrainedTokenRouter  # the public constructor picks the form too
    assert (
        type(copy.deepcopy(fine)) is FineGrainedTokenRouter
        and type(copy.deepcopy(TokenRouter(8, 3))) is TokenRouter
    )
    with pytest.raises(MtLoraError, match="unknown router kind 'bogus'"):
        make_router("bogus", num_experts=2)
    with pytest.raises(MtLoraError, match="exactly one expert"):
        make_router("none", num_experts=2)
    with pytest.raises(MtLoraError, match="not divisible"):
        make_router("task", rank=5, num_experts=2, task_num=3)
    with pytest.raises(MtLoraError, match="task_num"):
        make_router("task", rank=4, num_experts=2)


def test_task_router_config_rules_and_task_num_from_data() -> None:
    with pytest.raises(ConfigError, match="lora_rank=5.*divisible by expert_num=2"):
        MtLoraConfig(method="mmoelora", lora_rank=5, expert_num=2)
    with pytest.raises(ConfigError, match="enable_blc.*task gate"):
        MtLoraConfig(method="mmoelora", lora_rank=4, expert_num=2, enable_blc=True)
    with pytest.raises(ConfigError, match="mmoelora_general_task.*mmoelora only, not hydralora"):
        MtLoraConfig(method="hydralora", mmoelora_general_task=True)
    cfg = MtLoraConfig(method="mmoelora", lora_rank=4, expert_num=2)
    cfg.router_class.prepare_config(cfg, {"a": 0, "b": 1, "c": 2})
    assert cfg.task_num == 3
    cfg.task_num = 2
    with pytest.raises(ConfigError, match="--task_num 2: the data has 3 tasks"):
        cfg.router_class.prepare_config(cfg, {"a": 0, "b": 1, "c": 2})
    token = MtLoraConfig(method="hydralora", lora_nums=2)
    token.router_class.prepare_config(token, {"a": 0})  # nothing to fill for a token router
    assert token.task_num is None


def test_experts_view_is_a_view_in_every_layout() -> None:
    for kw in (dict(router="token", num_experts=3), dict(router="task", num_experts=2, task_num=2)):
        m = MultiExpertLoRA(8, 6, 4, **kw)
        view = m.router.experts_view(m.lora_B, m.num_experts)
        assert view.shape[:2] == (6, m.num_experts) and view.data_ptr() == m.lora_B.data_ptr()
        for e in range(m.num_experts):
            assert torch.equal(view[:, e], m.expert_B(e))
    m = MultiExpertLoRA(8, 6, 4, 2, router="task", task_num=2)
    assert m.expert_B(1).shape == (6, 2) and m.expert_B(1).data_ptr() == m.lora_B[:, 0, 2:].data_ptr()


class _UniformRouter(FineGrainedTokenRouter):
    """A router the layer has never heard of: uniform weights, from its forward (no fused GEMM)."""

    kind = "uniform_test"

    def forward(self, x2, state=None, batch_shape=()):
        return torch.full((x2.shape[0], self.num_groups, self.num_experts), 1.0 / self.num_experts)

    def fused_weight(self):
        return None


def test_the_layer_runs_any_router_through_the_interface() -> None:
    """No kind checks in the layer: a new router object plugs in, and equals frozen uniform routing."""
    torch.manual_seed(0)
    custom = MultiExpertLoRA(8, 6, 4, 3, router=_UniformRouter(8, 3, num_groups=2), scaling=2.0)
    torch.nn.init.normal_(custom.lora_B)
    frozen = MultiExpertLoRA(8, 6, 4, 3, router="token", num_groups=2, scaling=2.0)
    frozen.load_state_dict(custom.state_dict())
    frozen.fixed_routing = torch.full((2, 3), 1 / 3)
    x = torch.randn(2, 5, 8)
    assert custom.router_kind == "uniform_test"
    torch.testing.assert_close(custom(x), frozen(x), atol=0, rtol=0)
    with pytest.raises(MtLoraError, match="router has 2 experts, the adapter 3"):
        MultiExpertLoRA(8, 6, 4, 3, router=TokenRouter(8, 2))


def test_static_routing_is_not_a_module_and_not_saved() -> None:
    m = MultiExpertLoRA(8, 6, 4, 3, router="token")
    keys = set(m.state_dict())
    m.fixed_routing = torch.full((1, 3), 1 / 3)
    assert isinstance(m._override, StaticRouting) and not isinstance(m._override, torch.nn.Module)
    assert set(m.state_dict()) == keys and torch.equal(m.fixed_routing, torch.full((1, 3), 1 / 3))
    assert not any(isinstance(c, StaticRouting) for c in m.modules())
    m.fixed_routing = None
    assert m._override is None and m.fixed_routing is None


def test_task_gate_static_form_is_its_own_gate() -> None:
    torch.manual_seed(0)
    m = MultiExpertLoRA(8, 6, 4, 2, router="task", task_num=3)
    x = torch.randn(1, 4, 8)
    m.state.task_ids = torch.tensor([2])
    routed = m(x)
    gate = m.router.static_for_task(2)
    assert gate.shape == (1, 2) and torch.allclose(gate.sum(), torch.tensor(1.0))
    m.fixed_routing = gate
    torch.testing.assert_close(m(x), routed, atol=0, rtol=0)
    assert NoRouter().static_for_task(0) is None and TokenRouter(8, 2).static_for_task(0) is None


def test_base_router_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        Router.build(in_features=1, out_features=1, rank=1, num_experts=1)
    with pytest.raises(MtLoraError, match="computes no routing logits"):
        NoRouter().probs_from_logits(torch.zeros(1, 1))
