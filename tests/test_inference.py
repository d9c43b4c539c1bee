"""`mtlora.inference`: the one scoring / NLL / generation / routing-probe path, checked against naive copies
of the loops it replaced (tests/_reference.py) on the bundled model with real adapters (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from _reference import (
    old_encode,
    old_estimate_task_routing,
    old_evaluate_records,
    old_generate_answers,
    old_lorahub_losses,
    old_right_padded,
)

from mtlora import MtLoraConfig, get_mtlora_model
from mtlora.hub import load_tokenizer, resolve_model_path
from mtlora.inference import (
    ChoiceRequest,
    Engine,
    GenRequest,
    RoutingProbe,
    ScoreRequest,
    answer_records,
    encode_examples,
    pad_left,
    pad_right,
    prompt_ids,
    score_records,
)

TINY = "mtlora:stories260k"
WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "moon", "star"]
RECORDS = [
    r
    for w in WORDS
    for r in (
        {"instruction": "Repeat the word.", "input": w, "output": w, "task_type": "repeat"},
        {
            "instruction": "Say something about it.",
            "input": w,
            "output": f"the {w} is big",
            "task_type": "say",
        },
    )
]
TASK_MAP = {"repeat": 0, "say": 1}
METHODS = {
    "lora": dict(method="lora", lora_rank=4),
    "hydralora": dict(method="hydralora", lora_rank=4, lora_nums=3),
    "mmoelora": dict(method="mmoelora", lora_rank=4, expert_num=2, task_num=2),
    "mtlora_fgr": dict(
        method="mtlora", lora_rank=4, lora_nums=3, enable_fine_grained_routing=True, routing_group_size=16
    ),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def _model(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY)).eval()
    model = get_mtlora_model(base, MtLoraConfig(lora_dropout=0.0, **METHODS[name])).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would make every adapter the base model
        for a in model.adapters():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.3)
            for p in a.router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in METHODS}


def test_examples_and_padding_match_the_old_helpers(tok) -> None:
    old = old_encode(RECORDS, tok, 512, "paper")
    new = encode_examples(RECORDS, tok, 512, "paper")
    assert [(r, i, lab) for r, i, lab in old] == [(e.record, e.ids, e.labels) for e in new]
    for e in new:
        assert e.prompt == prompt_ids(e.record, tok) and e.prompt + e.target == e.ids
        assert all(v == -100 for v in e.labels[: e.prompt_len]) and e.labels[e.prompt_len :] == e.target
    rows = [(e.ids, e.labels) for e in new[:5]]
    got, want = pad_right(rows, 0, "cpu"), old_right_padded(rows, 0, "cpu")
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids, mask = pad_left([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    short = encode_examples(RECORDS, tok, 8, "paper")  # every target truncated away -> dropped
    assert len(short) < len(new)


@pytest.mark.parametrize("name", list(METHODS))
def test_score_records_equals_the_old_export_loop(models, tok, name) -> None:
    model = models[name]
    task_id = 1 if name == "mmoelora" else None
    fkw = {} if task_id is None else {"task_ids": task_id}
    acc, nll, n, toks = old_evaluate_records(model, tok, RECORDS, forward_kwargs=fkw, batch_size=3)
    engine = Engine(model, tok, batch_size=3, progress=False, eos_ids=[tok.eos_token_id])
    got = score_records(engine, RECORDS, task_id=task_id)
    assert (got.accuracy, got.examples, got.target_tokens) == (acc, n, toks)
    assert got.nll == nll  # same batches, same op order
    with model.disable_adapters():  # the engine reads the model at call time: contexts apply
        base = score_records(engine, RECORDS, generate=False)
    assert base.accuracy is None and base.nll != pytest.approx(got.nll, abs=1e-3)


def test_target_nll_per_batch_means_equal_the_old_lorahub_loop(models, tok) -> None:
    """Same batches, same op order: the LoRAHub objective's terms are bitwise those of the old loop."""
    model = models["mtlora_fgr"]
    examples = encode_examples(RECORDS, tok)
    for size in (len(examples), 3):
        batches = [
            old_right_padded([(e.ids, e.labels) for e in examples[i : i + size]], 0, "cpu")
            for i in range(0, len(examples), size)
        ]
        nll, batch_means = old_lorahub_losses(model, batches)
        res = Engine(model, tok, progress=False, batch_size=size).target_nll(examples)
        assert res.nll_sum / res.tokens == nll
        assert sum(b / n for b, n in res.batches) == batch_means
        assert sum(n for _, n in res.per_example) == res.tokens
        assert sum(x for x, _ in res.per_example) == pytest.approx(res.nll_sum, rel=1e-6)
        # the prefix-cached scoring path gives the same NLL up to float summation order
        lls = Engine(model, tok, progress=False, min_prefix=4).loglikelihood(
            [ScoreRequest(e.prompt, e.target) for e in examples], 512
        )
        assert -sum(ll for ll, _ in lls) / res.tokens == pytest.approx(nll, abs=1e-5)


@pytest.mark.parametrize("name", ["lora", "mmoelora", "mtlora_fgr"])
def test_answer_records_equals_the_old_demo_generate(models, tok, name) -> None:
    model = models[name]
    task_map = TASK_MAP if name == "mmoelora" else None
    old = old_generate_answers(
        model, tok, RECORDS, device="cpu", batch_size=5, max_new_tokens=10, task_map=task_map
    )
    engine = Engine(model, tok, batch_size=5, progress=False)
    assert answer_records(engine, RECORDS, max_new_tokens=10, task_map=task_map) == old


def test_per_request_task_ids_equal_one_call_per_task(models, tok) -> None:
    """Mixed task ids in one call: the gate sees each request's own id (never a shared prefix or batch)."""
    model = models["mmoelora"]
    engine = Engine(model, tok, batch_size=4, progress=False, min_prefix=2)
    prompts = [prompt_ids(r, tok) for r in RECORDS]
    tids = [TASK_MAP[r["task_type"]] for r in RECORDS]
    mixed = engine.generate([GenRequest(p, task_id=t) for p, t in zip(prompts, tids)], 6)
    for t in (0, 1):
        alone = engine.generate([GenRequest(p) for p, tt in zip(prompts, tids) if tt == t], 6, task_id=t)
        assert [g.tokens for g, tt in zip(mixed, tids) if tt == t] == [g.tokens for g in alone]
    nxt = engine.next_token_argmax([GenRequest(p, task_id=t) for p, t in zip(prompts, tids)])
    for t in (0, 1):
        alone = engine.next_token_argmax(
            [GenRequest(p) for p, tt in zip(prompts, tids) if tt == t], task_id=t
        )
        assert [x for x, tt in zip(nxt, tids) if tt == t] == alone
    ctx, cont = prompts[0], [10, 11, 12]
    a, b = engine.loglikelihood([ScoreRequest(ctx, cont, task_id=0), ScoreRequest(ctx, cont, task_id=1)], 64)
    assert a[0] == pytest.approx(
        engine.loglikelihood([ScoreRequest(ctx, cont)], 64, task_id=0)[0][0], abs=1e-5
    )
    assert a[0] != pytest.approx(b[0], abs=1e-6)  # the gate changes the score


def test_choose_ranks_choices_like_separate_scoring(models, tok) -> None:
    engine = Engine(models["hydralora"], tok, progress=False, min_prefix=2)
    ctx = prompt_ids(RECORDS[0], tok)
    choices = [[30], [31, 32], [40], [50, 51]]
    (c,) = engine.choose([ChoiceRequest(ctx, choices)], 128)
    lls = [ll for ll, _ in engine.loglikelihood([ScoreRequest(ctx, ch) for ch in choices], 128)]
    assert c.loglikelihoods == pytest.approx(lls, abs=1e-6)
    assert c.best == max(range(4), key=lambda i: (lls[i], -i))
    assert len(c.greedy) == 4


def test_eos_ids_override_and_bare_model_needs_a_tokenizer(models, tok) -> None:
    model = models["lora"]
    default = Engine(model, tok, progress=False)
    assert tok.eos_token_id in default.eos_ids
    assert Engine(model, tok, progress=False, eos_ids=[7]).eos_ids == {7}
    with pytest.raises(TypeError, match="tokenizer"):
        Engine(model)


@pytest.mark.parametrize("name", ["hydralora", "mtlora_fgr"])
def test_routing_probe_equals_the_old_calibration_prehook(models, tok, name) -> None:
    from mtlora.export import estimate_task_routing

    model = models[name]
    want, want_tokens = old_estimate_task_routing(model, tok, RECORDS, batch_size=3)
    got = estimate_task_routing(model, tok, RECORDS, batch_size=3)
    assert got.tokens == want_tokens and set(got.probs) == set(want)
    for n in want:
        assert torch.allclose(got.probs[n], want[n], atol=1e-6, rtol=0)
    seen = []
    routed = [(n, a) for n, a in model.named_adapters()][:1]
    with RoutingProbe(
        routed, lambda n, p, b: seen.append((n, tuple(p.shape), b["attention_mask"].numel()))
    ) as pr:
        pr.run(
            model,
            [{"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}],
        )
    assert seen == [(routed[0][0], (3, routed[0][1].num_groups, routed[0][1].num_experts), 3)]
    assert not routed[0][1]._forward_pre_hooks  # removed on exit
    seen_router = []
    with RoutingProbe(routed, lambda n, p, b: seen_router.append(p), hook="router") as pr:
        pr.run(model, [{"input_ids": torch.tensor([[1, 5, 6]])}])
    assert len(seen_router) == 1 and seen_router[0].shape == (
        3,
        routed[0][1].num_groups,
        routed[0][1].num_experts,
    )
    assert not routed[0][1].router._forward_hooks
    with pytest.raises(ValueError, match="hook"):
        RoutingProbe(routed, print, hook="layer")
