"""The engine's shortcuts (shared-prefix KV cache, batching, padding) change nothing but float rounding,
and the paper protocol reproduces a direct transcription of the released scripts' inference."""

from __future__ import annotations

import pytest
import torch

from mtlora.evaluation import data as D
from mtlora.evaluation.bbh import evaluate_bbh
from mtlora.evaluation.engine import Engine, GenRequest, ScoreRequest
from mtlora.evaluation.mmlu import evaluate_mmlu

PREFIX = (
    "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog.\n\n"
)
QUESTIONS = [
    "One day she saw a big red ball.",
    "Tom",
    "The sun was hot and bright in the sky and",
    "She said",
]


def _engines(loaded):
    cached = Engine(loaded, batch_size=3, prefix_cache=True, min_prefix=4, progress=False)
    plain = Engine(loaded, batch_size=1, prefix_cache=False, progress=False)
    return cached, plain


def test_loglikelihood_with_prefix_cache_equals_plain(tiny_loaded) -> None:
    cached, plain = _engines(tiny_loaded)
    reqs = []
    for q in QUESTIONS:
        ctx = cached.encode(PREFIX + q + "\nAnswer:")
        for cont in (" A", " B", " yes", " a long continuation"):
            whole = cached.encode(PREFIX + q + "\nAnswer:" + cont)
            reqs.append(ScoreRequest(ctx, whole[len(ctx) :], group=0))
    a = cached.loglikelihood(reqs, max_length=512)
    b = plain.loglikelihood(reqs, max_length=512)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4
    assert [x[1] for x in a] == [y[1] for y in b]
    assert cached.stats["tokens_cached"] > 0 and plain.stats["tokens_cached"] == 0


def test_greedy_generation_matches_hf_generate(tiny_loaded) -> None:
    cached, plain = _engines(tiny_loaded)
    prompts = [cached.encode(PREFIX + q) for q in QUESTIONS]
    ours = cached.generate([GenRequest(p, 0) for p in prompts], max_new_tokens=24)
    batched_left_padded = Engine(tiny_loaded, batch_size=4, prefix_cache=False, progress=False).generate(
        [GenRequest(p, 0) for p in prompts], max_new_tokens=24
    )
    model = tiny_loaded.model
    for p, g, g2 in zip(prompts, ours, batched_left_padded):
        with torch.inference_mode():
            out = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        ref = out[0, len(p) :].tolist()
        for i, t in enumerate(ref):
            if t in cached.eos_ids:
                ref = ref[:i]
                break
        assert g.tokens == ref == g2.tokens
    assert ours[0].text == cached.decode(ours[0].tokens)


def test_stop_sequences_end_generation(tiny_loaded) -> None:
    cached, _ = _engines(tiny_loaded)
    prompts = [cached.encode(PREFIX + q) for q in QUESTIONS]
    free = cached.generate([GenRequest(p, 0) for p in prompts], max_new_tokens=40)
    stop = ["."]
    stopped = cached.generate([GenRequest(p, 0) for p in prompts], max_new_tokens=40, stop=stop)
    for f, s in zip(free, stopped):
        if "." in f.text:
            assert s.finish == "stop" and s.text.split(".")[0] == f.text.split(".")[0]
            assert f.tokens[: len(s.tokens)] == s.tokens


def test_continuous_batching_matches_one_prompt_at_a_time(tiny_loaded) -> None:
    """Rows finish at different steps and waiting prompts join the running batch: same tokens as alone."""
    more = [
        "Max the cat",
        "The little bird sang a song.",
        "Mom said no.",
        "Ben and Sue",
        "It was a rainy day",
    ]
    batched = Engine(tiny_loaded, batch_size=3, prefix_cache=True, min_prefix=4, progress=False)
    alone = Engine(tiny_loaded, batch_size=1, prefix_cache=False, progress=False)
    prompts = [GenRequest(batched.encode(PREFIX + q), 0) for q in QUESTIONS + more]
    a = batched.generate(prompts, max_new_tokens=30, stop=["."])
    b = alone.generate(prompts, max_new_tokens=30, stop=["."])
    assert [(g.tokens, g.finish) for g in a] == [(g.tokens, g.finish) for g in b]
    assert len({len(g.tokens) for g in a}) > 2  # rows really ended at different steps


def _paper_generate(loaded, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The released scripts' inference, transcribed: left padding, truncation at 2048, HF generate, strip."""
    tok, model = loaded.tokenizer, loaded.model
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=2048)
    finally:
        tok.padding_side = side
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return [tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]


def test_paper_bbh_matches_transcribed_reference(tiny_loaded) -> None:
    task = D.load_bbh_task(D.bundled_data_dir("bbh"), "boolean_expressions", need_cot=False)
    engine = Engine(tiny_loaded, batch_size=4, progress=False)
    res = evaluate_bbh(engine, [task], "paper", 3, max_length=512, limit=6)
    rows = res["task_results"]["boolean_expressions"]["predictions"]
    assert all(
        r["num_exemplars"] == 3 for r in rows
    )  # short task: the full 3-shot prompt fits, as in the paper
    shots = "".join(f"Q: {e.input}\nA: {e.target}\n\n" for e in task.examples[:3])
    prompts = [shots + f"Q: {e.input}\nA:" for e in task.examples[3:9]]
    ref = _paper_generate(tiny_loaded, prompts, 32)
    assert [r["output"] for r in rows] == ref
    assert [r["correct"] for r in rows] == [
        e.target.lower() in o.lower() for e, o in zip(task.examples[3:9], ref)
    ]


@pytest.mark.parametrize("num_few_shot", [0, 1])
def test_paper_mmlu_matches_transcribed_reference(tiny_loaded, num_few_shot: int) -> None:
    subject = D.load_mmlu_subject(D.bundled_data_dir("mmlu"), "high_school_geography")
    engine = Engine(tiny_loaded, batch_size=4, progress=False)
    res = evaluate_mmlu(engine, [subject], "paper", num_few_shot, max_length=512, limit=8)
    rows = res["predictions"]["high_school_geography"]
    assert all(r["num_exemplars"] == num_few_shot for r in rows)

    def block(q: D.MMLUQuestion) -> str:
        return (
            f"Question: {q.question}\n"
            + "".join(f"{L}. {c}\n" for L, c in zip("ABCD", q.choices))
            + "Answer:"
        )

    shots = "".join(block(d) + f" {'ABCD'[d.answer]}\n\n" for d in subject.dev[:num_few_shot])
    ref = _paper_generate(tiny_loaded, [shots + block(q) for q in subject.test[:8]], 1)
    assert [r["prediction"] for r in rows] == [s[0] if s else "X" for s in ref]


def test_long_prompts_drop_exemplars_and_keep_the_question(tiny_loaded) -> None:
    """5-shot MMLU does not fit the tiny model's 512 tokens: exemplars go, the question stays whole."""
    anatomy = D.load_mmlu_subject(D.bundled_data_dir("mmlu"), "anatomy")
    engine = Engine(tiny_loaded, batch_size=4, progress=False)
    res = evaluate_mmlu(engine, [anatomy], "harness", 5, max_length=512, limit=4)
    rows = res["predictions"]["anatomy"]
    assert all(0 < r["num_exemplars"] < 5 and not r["question_truncated"] for r in rows)
    assert res["subject_details"]["anatomy"]["prompts_with_fewer_exemplars"] == 4
    # A question longer than the whole window is the only case that is cut (and it is flagged).
    history = D.load_mmlu_subject(D.bundled_data_dir("mmlu"), "high_school_european_history")
    res = evaluate_mmlu(engine, [history], "harness", 5, max_length=512, limit=1)
    assert res["predictions"]["high_school_european_history"][0]["question_truncated"]
    assert res["subject_details"]["high_school_european_history"]["questions_truncated"] == 1
