"""Paper prompt and label masking, chat template, truncation drops, on-disk cache, collator."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from mtlora.data import (
    DataCollatorForInstructions,
    build_task_map,
    cache_key,
    cached_tokenize,
    encode_record,
    resolve_pad_token_id,
    tokenize_records,
)
from mtlora.data import tokenize as tok_mod
from mtlora.errors import DataError

WITH_INPUT = {
    "instruction": "Sum the numbers.",
    "input": "2 and 3",
    "output": "The sum is 5.",
    "task_type": "math",
}
NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Blue.", "task_type": "open_qa"}
RECORDS = [WITH_INPUT, NO_INPUT, {**WITH_INPUT, "output": "Five.", "task_type": "math"}]

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _plain(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_paper_prompt_layout_and_masking(tokenizer) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tok_mod._eos_literal_is_eos(tokenizer)  # the literal "</s>" is EOS for this SentencePiece vocab
    ids, labels = encode_record(WITH_INPUT, tokenizer, 512)
    source = [bos] + _plain(tokenizer, "Sum the numbers.\n2 and 3") + [eos]
    target = _plain(tokenizer, "The sum is 5.") + [eos]
    assert ids == source + target
    assert labels == [-100] * len(source) + target  # exactly the source is masked
    # identical to tokenising the paper's literal text "prompt</s>"
    assert _plain(tokenizer, "Sum the numbers.\n2 and 3</s>") == source[1:]
    ids2, labels2 = encode_record(NO_INPUT, tokenizer, 512)
    source2 = [bos] + _plain(tokenizer, "Name a colour.") + [eos]  # no "\n" when input is empty
    assert ids2[: len(source2)] == source2 and labels2.count(-100) == len(source2)


def test_bos_is_ensured_even_if_tokenizer_does_not_add_it(tokenizer, bare_tokenizer) -> None:
    assert bare_tokenizer("hi")["input_ids"][0] != bare_tokenizer.bos_token_id  # transformers 5 trap
    assert encode_record(WITH_INPUT, bare_tokenizer, 512) == encode_record(WITH_INPUT, tokenizer, 512)
    ids, _ = encode_record(WITH_INPUT, tokenizer, 512, add_bos=False)
    assert ids[0] != tokenizer.bos_token_id


def test_tokenizer_that_appends_eos_gets_one_separator(
    tokenizer, bare_tokenizer_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from transformers import AutoTokenizer

    shutil.copyfile(bare_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((bare_tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    eos_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert eos_tok("hi")["input_ids"][-1] == eos_tok.eos_token_id
    assert encode_record(WITH_INPUT, eos_tok, 512) == encode_record(WITH_INPUT, tokenizer, 512)


class _CharTokenizer:
    """A tokenizer whose vocabulary has no "</s>" piece: the literal must not be used, the EOS id is."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, None, None
    chat_template = None

    def _one(self, text: str, add_special_tokens: bool) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + (ord(c) % 200) for c in text]

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [self._one(t, add_special_tokens) for t in text]}
        return {"input_ids": self._one(text, add_special_tokens)}


def test_eos_id_appended_when_literal_is_not_eos() -> None:
    tok = _CharTokenizer()
    assert not tok_mod._eos_literal_is_eos(tok)
    ids, labels = encode_record(NO_INPUT, tok, 512)
    source = [1] + tok._one("Name a colour.", False) + [2]
    assert ids == source + tok._one("Blue.", False) + [2]
    assert labels[: len(source)] == [-100] * len(source)


def test_tokenize_records_columns_truncation_and_drops(tokenizer, caplog) -> None:
    dataset, stats = tokenize_records(RECORDS, tokenizer, 512, return_stats=True)
    assert dataset.column_names == ["input_ids", "labels", "task_ids"]
    assert len(dataset) == 3 and stats.num_dropped == 0 and stats.num_truncated == 0
    assert dataset["task_ids"] == [0, 1, 0]  # {"math": 0, "open_qa": 1}
    assert dataset[0]["input_ids"] == encode_record(WITH_INPUT, tokenizer, 512)[0]

    source_len = (
        len(encode_record(WITH_INPUT, tokenizer, 512)[0]) - len(_plain(tokenizer, "The sum is 5.")) - 1
    )
    # cut inside the target: kept, and truncated from the right
    ids, labels = encode_record(WITH_INPUT, tokenizer, source_len + 2)
    assert len(ids) == source_len + 2 and sum(label != -100 for label in labels) == 2
    # the whole target cut away: dropped, counted and logged -- not silently kept
    with caplog.at_level(logging.WARNING, logger="mtlora.data"):
        dataset, stats = tokenize_records([WITH_INPUT, NO_INPUT], tokenizer, source_len, return_stats=True)
    assert stats.num_dropped == 1 and len(dataset) == 1 and stats.num_examples == 1
    assert "1 dropped" in caplog.text
    assert encode_record(WITH_INPUT, tokenizer, source_len) is None
    with pytest.raises(DataError, match="every example was dropped"):
        tokenize_records([WITH_INPUT], tokenizer, 3)


def test_task_map_is_respected(tokenizer) -> None:
    dataset = tokenize_records(RECORDS, tokenizer, 64, task_map={"open_qa": 0, "math": 1, "other": 2})
    assert dataset["task_ids"] == [1, 0, 1]
    with pytest.raises(DataError, match="not in the task map"):
        tokenize_records(RECORDS, tokenizer, 64, task_map={"math": 0})
    with pytest.raises(DataError, match="unknown prompt template"):
        tokenize_records(RECORDS, tokenizer, 64, template="alpaca")


def test_chat_template(tokenizer) -> None:
    with pytest.raises(DataError, match="chat template"):
        tokenize_records(RECORDS, tokenizer, 128, template="chat")
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT_TEMPLATE
    ids, labels = encode_record(WITH_INPUT, chat_tok, 128, template="chat")
    prompt = chat_tok.apply_chat_template(
        [{"role": "user", "content": "Sum the numbers.\n2 and 3"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert ids[: len(prompt)] == list(prompt)
    assert labels == [-100] * len(prompt) + ids[len(prompt) :]
    assert ids[-1] == chat_tok.eos_token_id and labels[-1] == chat_tok.eos_token_id
    dataset = tokenize_records(RECORDS, chat_tok, 128, template="chat")
    assert len(dataset) == 3


def test_collator_pads_right_and_masks_by_length(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    features = [
        {"input_ids": [1, 5, eos, 7, eos], "labels": [-100, -100, -100, 7, eos], "task_ids": 3},
        {"input_ids": [1, 9, eos], "labels": [-100, -100, eos], "task_ids": 0},
    ]
    collator = DataCollatorForInstructions(pad_token_id=eos)  # pad id equal to a real token on purpose
    batch = collator(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert batch["input_ids"].tolist() == [[1, 5, eos, 7, eos], [1, 9, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]  # real EOS tokens stay visible
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, eos], [-100, -100, eos, -100, -100]]
    assert batch["task_ids"].tolist() == [3, 0] and batch["task_ids"].shape == (2,)
    assert all(t.dtype == torch.long for t in batch.values())

    padded = DataCollatorForInstructions(pad_token_id=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].sum().item() == 8

    collator = DataCollatorForInstructions.from_tokenizer(tokenizer)
    assert (
        collator.pad_token_id == resolve_pad_token_id(tokenizer) == 0
    )  # pad or <unk>: id 0, as in the paper
    dataset = tokenize_records(RECORDS, tokenizer, 64)
    batch = collator([dataset[i] for i in range(len(dataset))])
    lengths = [len(x) for x in dataset["input_ids"]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    with pytest.raises(DataError, match="task_ids"):
        collator([{"input_ids": [1], "labels": [1]}])


def test_cache_hit_and_key_sensitivity(tokenizer, tmp_path: Path, monkeypatch) -> None:
    first, stats = cached_tokenize(RECORDS, tokenizer, 64, cache_dir=tmp_path, return_stats=True)
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith("paper-msl64-")
    assert first[:] == tokenize_records(RECORDS, tokenizer, 64)[:]

    def _boom(*args, **kwargs):
        raise AssertionError("cache miss: re-tokenised")

    monkeypatch.setattr(tok_mod, "_tokenize", _boom)
    again, stats_again = cached_tokenize(RECORDS, tokenizer, 64, cache_dir=tmp_path, return_stats=True)
    assert again[:] == first[:] and stats_again == stats
    monkeypatch.undo()

    base = cache_key(RECORDS, tokenizer, 64)
    assert cache_key(list(RECORDS), tokenizer, 64) == base
    assert cache_key(RECORDS, tokenizer, 65) != base
    assert cache_key(RECORDS, tokenizer, 64, template="chat") != base
    assert cache_key(RECORDS, tokenizer, 64, task_map={"open_qa": 0, "math": 1}) != base
    assert cache_key(RECORDS[:2], tokenizer, 64) != base
    assert cache_key([{**RECORDS[0], "output": "changed"}, *RECORDS[1:]], tokenizer, 64) != base
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT_TEMPLATE
    assert cache_key(RECORDS, chat_tok, 64) != base  # tokenizer changes invalidate the cache too
    assert build_task_map(RECORDS) == {"math": 0, "open_qa": 1}

    cached_tokenize(RECORDS, tokenizer, 32, cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_real_dolly_tokenizes(shared_data, tokenizer) -> None:
    from mtlora.data import convert_dolly

    records = convert_dolly(shared_data("dolly15k_sample", "dolly_sample.jsonl")).records
    dataset, stats = tokenize_records(records, tokenizer, 256, return_stats=True)
    assert stats.num_records == 269 and stats.num_examples + stats.num_dropped == 269
    # this 512-piece vocabulary makes long Dolly contexts very long: some are cut, some lose the whole target
    source_lengths = [encode_record(r, tokenizer, 10**6)[1].count(-100) for r in records]
    assert stats.num_dropped == sum(n >= 256 for n in source_lengths) > 0
    assert stats.num_truncated > 0
    assert set(dataset["task_ids"]) <= set(range(8))
    assert all(len(x) <= 256 for x in dataset["input_ids"])


def test_over_long_fields_are_cut_by_characters_without_changing_the_kept_tokens(tokenizer) -> None:
    """The character budget before tokenising keeps exactly the tokens truncation would keep."""
    words = "the quick brown fox jumps over lazy dogs while seven wizards quietly hex jovial bankers".split()
    long_text = " ".join(words[i % len(words)] + str(i % 7) for i in range(30_000))  # ~200k characters
    budget = tok_mod.char_budget(tokenizer, 64)
    assert budget is not None and budget < len(long_text)
    for record in (
        {**WITH_INPUT, "output": long_text},  # long target: cut, same first tokens
        {**WITH_INPUT, "input": long_text},  # long prompt: the target is cut away either way (dropped)
    ):
        source, target = tok_mod._encode_paper_batch([record], tokenizer, None, 1 << 40)[0]  # no cut
        full = tok_mod._truncate(source, target, 64)
        assert encode_record(record, tokenizer, 64) == (None if full is None else (full[0], full[1]))


@pytest.mark.slow
def test_a_10mb_record_does_not_cost_gigabytes(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Peak memory stays proportional to max_seq_length (the uncapped run peaked at 2.3 GB for 10 MB)."""
    import json
    import subprocess
    import sys

    record = {
        "instruction": "Summarise.",
        "input": "lorem ipsum dolor " * 580_000,
        "output": "ok",
        "task_type": "t",
    }
    data = tmp_path / "big.json"
    data.write_text(json.dumps([record, {**record, "input": "short"}]))
    script = f"""
import resource, json
from mtlora.data import load_records, tokenize_records
from mtlora.hub import load_tokenizer
tok = load_tokenizer({str(tokenizer_dir)!r})
records = load_records({str(data)!r})
tokenize_records(records[1:], tok, 128)  # warm up: imports and one-time set-up are not the record's cost
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = tokenize_records(records, tok, 128)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grew_kb": after - before, "examples": len(ds)}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["examples"] == 1  # the 10 MB prompt leaves no room for its target: dropped, as before
    assert out["grew_kb"] < 150_000, out  # < 150 MB of growth (uncapped: ~1.7 GB)
