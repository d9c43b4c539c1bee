"""Batched scoring and greedy generation with a shared-prefix KV cache.

Why this exists instead of calling ``model.generate`` per prompt: few-shot prompts of one task share a long
prefix (header and exemplars, often 80-95 % of the tokens). We encode that prefix once, keep its key/value
cache, and run only each question's suffix, batched and sorted by length so padding stays small. That is
where the speed-up over lm-evaluation-harness comes from (it re-encodes the full prompt for every question).

Numerics: the prefix is a prefix of the *token sequences* (longest common token prefix within a group),
never a separately tokenised string, so the model sees exactly the tokens of the un-cached computation;
results differ only by floating-point summation order (~1e-6 in fp32).

Layouts:
* scoring (log-likelihoods): ``[prefix | suffix | right padding]``; right padding never influences earlier
  positions of a causal model, so no attention mask is needed (as in the harness);
* generation: ``[prefix | left padding | suffix | generated]``; the padding is masked and ``position_ids``
  continue the prefix, so every row sees its tokens at the same positions as if it were alone. Rows that
  finish are dropped and waiting prompts join the running batch (continuous batching): since rotary
  position information is already inside the cached keys, key/value columns can be padded, merged and
  compacted freely as long as the mask marks which ones a row may attend to.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mtlora.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from mtlora.inference.examples import Example


@dataclass
class ScoreRequest:
    """Score ``continuation`` after ``context`` (token ids), lm-evaluation-harness style.

    ``group`` says which requests share a prompt prefix (e.g. the subject and the number of exemplars).
    ``task_id`` (None: the call's ``task_id``) is the task a task-conditioned router sees for this request;
    requests with different task ids never share a prefix cache or a batch (the gate changes keys/values).
    """

    context: list[int]
    continuation: list[int]
    group: Hashable = None
    task_id: int | None = None


@dataclass
class GenRequest:
    """Greedy generation (or next-token prediction) after ``prompt``; ``group``/``task_id`` as for scoring."""

    prompt: list[int]
    group: Hashable = None
    task_id: int | None = None


@dataclass
class ChoiceRequest:
    """Pick one of ``choices`` (continuation token lists) after ``context`` by log-likelihood (harness ``acc``)."""

    context: list[int]
    choices: list[list[int]]
    group: Hashable = None
    task_id: int | None = None


@dataclass
class Choice:
    """Log-likelihood of every choice, the best one (ties: the first, like ``np.argmax``) and, per choice,
    whether it is the greedy decode."""

    loglikelihoods: list[float]
    best: int
    greedy: list[bool]


@dataclass
class NllResult:
    """Teacher-forced negative log-likelihood of targets: the sum, the target tokens, ``(nll, tokens)`` per
    example in input order and per batch of the engine's ``batch_size`` (LoRAHub's objective sums per-batch
    means, so it runs with its own batch size)."""

    nll_sum: float
    tokens: int
    per_example: list[tuple[float, int]]
    batches: list[tuple[float, int]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """Token-mean NLL (0 tokens: the sum itself, 0.0)."""
        return self.nll_sum / max(self.tokens, 1)


@dataclass
class Generation:
    tokens: list[int]
    text: str  # decoded with skip_special_tokens, before any stop-sequence cut
    finish: str  # "eos" | "stop" | "length"


def argmax_choice(loglikelihoods: Sequence[float]) -> int:
    """Harness ``acc``: the choice with the highest log-likelihood; ties go to the first (``np.argmax``)."""
    best = 0
    for i, ll in enumerate(loglikelihoods):
        if ll > loglikelihoods[best]:
            best = i
    return best


def _hf_model(model: Any) -> Any:
    """The underlying ``PreTrainedModel`` (for signature checks) of a plain, peft or mtlora model."""
    seen = 0
    while seen < 4:
        seen += 1
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif type(model).__name__ == "MtLoraModel":
            model = model.base_model
        else:
            break
    return model


class Engine:
    """Runs a causal LM over many prompts; see the module docstring for the batching layouts.

    ``model_or_loaded`` is either a loaded bundle (anything with ``model``, ``tokenizer`` and ``device``,
    e.g. :func:`mtlora.hub.load_model`'s result; kept as ``self.loaded``) or a model, then with
    ``tokenizer`` (and ``device``, default: the model's). The model is read at every call, so context
    managers around a call (``static_routing``, ``disable_adapters``) apply. ``eos_ids`` overrides the ids
    that end a generation (default: tokenizer EOS plus the generation config's, as HF ``generate``).
    """

    def __init__(
        self,
        model_or_loaded: Any,
        tokenizer: Any = None,
        *,
        device: Any = None,
        batch_size: int = 16,
        prefix_cache: bool = True,
        min_prefix: int = 16,
        progress: bool = True,
        eos_ids: Iterable[int] | None = None,
    ) -> None:
        import torch

        from mtlora.dtypes import model_device

        self.torch = torch
        is_loaded = tokenizer is None and hasattr(model_or_loaded, "tokenizer")
        self.loaded = model_or_loaded if is_loaded else None
        self.model = model_or_loaded.model if is_loaded else model_or_loaded
        self.tokenizer = model_or_loaded.tokenizer if is_loaded else tokenizer
        if self.tokenizer is None:
            raise TypeError("Engine(model, tokenizer): a bare model needs its tokenizer")
        if device is None:
            device = model_or_loaded.device if is_loaded else model_device(self.model)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.prefix_cache = prefix_cache
        self.min_prefix = min_prefix
        self.progress = progress
        params = inspect.signature(_hf_model(self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids() if eos_ids is None else {int(e) for e in eos_ids}
        self.stats = {"forward_calls": 0, "tokens_computed": 0, "tokens_cached": 0}

    # ------------------------------------------------------------------ helpers
    def _eos_ids(self) -> set[int]:
        """Token ids that end a generation: the tokenizer's EOS plus the model's generation config (as HF does)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(_hf_model(self.model), "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    def encode(self, text: str) -> list[int]:
        """Tokenise with the tokenizer's default special tokens (BOS for Llama), like both reference codes."""
        return list(self.tokenizer(text, verbose=False)["input_ids"])

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    def _forward(
        self,
        input_ids: Any,
        cache: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        task_id: int | None = None,
        keep: int | None = None,
    ) -> tuple[Any, Any]:
        torch = self.torch
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if keep is not None and self._keep_kw is not None:
            kwargs[self._keep_kw] = keep
        if task_id is not None:
            kwargs["task_ids"] = torch.full(
                (input_ids.shape[0],), int(task_id), dtype=torch.long, device=self.device
            )
        out = self.model(**kwargs)
        self.stats["forward_calls"] += 1
        self.stats["tokens_computed"] += int(input_ids.numel())
        new_cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out["logits"], new_cache

    def _prefix_state(self, prefix: list[int], task_id: int | None) -> list[tuple[Any, Any]] | None:
        """Encode ``prefix`` once (batch 1) and keep its per-layer key/value tensors."""
        if not prefix:
            return None
        ids = self.torch.tensor([prefix], dtype=self.torch.long, device=self.device)
        _, cache = self._forward(ids, task_id=task_id, keep=1)
        return _cache_tensors(cache)

    def _expanded_cache(self, state: list[tuple[Any, Any]] | None, batch: int) -> Any:
        if state is None:
            return None
        self.stats["tokens_cached"] += batch * int(state[0][0].shape[-2])
        return _make_cache([(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in state])

    def _prefix_len(self, seqs: Sequence[Sequence[int]], caps: Sequence[int]) -> int:
        """Longest common token prefix of ``seqs``, at most ``min(caps)``; 0 if too short to be worth it."""
        if not self.prefix_cache or len(seqs) < 2:
            return 0
        limit = min(min(caps), min(len(s) for s in seqs))
        first = seqs[0]
        n = 0
        while n < limit and all(s[n] == first[n] for s in seqs):
            n += 1
        return n if n >= self.min_prefix else 0

    # ------------------------------------------------------------------ scoring
    def loglikelihood(
        self,
        requests: Sequence[ScoreRequest],
        max_length: int,
        task_id: int | None = None,
        desc: str = "scoring",
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), continuation is the greedy decode)`` per request.

        Same conventions as the harness: the model input is ``(context + continuation)[-(max_length+1):][:-1]``
        (left-truncated if too long) and requests whose inputs (and task ids) coincide share one forward pass.
        """
        torch = self.torch
        # Unique (task id, model input); each request reads len(continuation) positions at the end of its input.
        users: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
        targets: list[list[int]] = []
        need: dict[tuple[Any, tuple[int, ...]], int] = {}
        groups: dict[tuple[Any, tuple[int, ...]], Hashable] = {}
        for idx, r in enumerate(requests):
            if not r.context or not r.continuation:
                raise ValueError("context and continuation must be non-empty token lists")
            full = (r.context + r.continuation)[-(max_length + 1) :]
            key = (task_id if r.task_id is None else r.task_id, tuple(full[:-1]))
            targets.append(full[-len(r.continuation) :])
            users.setdefault(key, []).append(idx)
            groups.setdefault(key, r.group)
            need[key] = max(need.get(key, 0), len(r.continuation))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        by_group: dict[tuple[Hashable, Any], list[tuple[int, ...]]] = {}
        for tid, inp in users:
            by_group.setdefault((groups[tid, inp], tid), []).append(inp)
        bar = self._bar(len(users), desc)
        with torch.inference_mode():
            for (_, tid), members in by_group.items():
                plen = self._prefix_len(members, [len(m) - need[tid, m] for m in members])
                state = self._prefix_state(list(members[0][:plen]), tid)
                for chunk, batch, width in self._suffix_batches(members, plen):
                    keep = width - min(len(m) - plen - need[tid, m] for m in chunk)
                    logits, _ = self._forward(
                        batch.to(self.device),
                        cache=self._expanded_cache(state, len(chunk)),
                        task_id=tid,
                        keep=keep,
                    )
                    logits = logits[:, -keep:] if logits.shape[1] > keep else logits
                    offset = width - logits.shape[1]  # column of logits[:, 0] in the suffix
                    for i, m in enumerate(chunk):
                        end = len(m) - plen - offset
                        logp = torch.log_softmax(logits[i, end - need[tid, m] : end].float(), dim=-1)
                        for idx in users[tid, m]:
                            cont = torch.tensor(targets[idx], dtype=torch.long, device=logp.device)
                            rows = logp[-len(cont) :]
                            ll = float(rows.gather(1, cont.unsqueeze(1)).sum())
                            results[idx] = (ll, bool((rows.argmax(dim=-1) == cont).all()))
                    bar.update(len(chunk))
        bar.close()
        return results

    def choose(
        self,
        requests: Sequence[ChoiceRequest],
        max_length: int,
        task_id: int | None = None,
        desc: str = "scoring",
    ) -> list[Choice]:
        """Multiple choice by log-likelihood (lm-eval ``acc``): one scoring call over every (context, choice)."""
        flat = [ScoreRequest(r.context, list(c), r.group, r.task_id) for r in requests for c in r.choices]
        scores = iter(self.loglikelihood(flat, max_length, task_id=task_id, desc=desc))
        out = []
        for r in requests:
            got = [next(scores) for _ in r.choices]
            lls = [ll for ll, _ in got]
            out.append(Choice(loglikelihoods=lls, best=argmax_choice(lls), greedy=[g for _, g in got]))
        return out

    def target_nll(
        self, examples: Sequence[Example], *, task_id: int | None = None, desc: str = "nll"
    ) -> NllResult:
        """Teacher-forced NLL of each example's target (its labels) given its prompt, mathematically
        ``-loglikelihood(prompt, target)``.

        Why not the prefix-cached scoring path: target NLLs feed comparisons (export's routed vs exported
        gap, LoRAHub's objective that nevergrad ranks) whose earlier numbers must not move. So this is the
        plain teacher-forced forward the package always used: consecutive batches of ``batch_size`` examples,
        right-padded with an attention mask, fp32 ``log_softmax``; each batch's sum is kept as computed
        (``NllResult.batches``) and the total is their float64 sum.
        """
        from mtlora.inference.batching import pad_right

        torch = self.torch
        per_example: list[tuple[float, int]] = []
        batches: list[tuple[float, int]] = []
        bar = self._bar(len(examples), desc)
        with torch.no_grad():
            for start in range(0, len(examples), self.batch_size):
                chunk = examples[start : start + self.batch_size]
                batch = pad_right([(e.ids, e.labels) for e in chunk], self.pad_id, self.device)
                kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                if task_id is not None:
                    kwargs["task_ids"] = torch.full(
                        (len(chunk),), int(task_id), dtype=torch.long, device=self.device
                    )
                logits = self.model(**kwargs).logits
                self.stats["forward_calls"] += 1
                self.stats["tokens_computed"] += int(batch["input_ids"].numel())
                labels = batch["labels"][:, 1:]
                valid = labels != IGNORE_INDEX
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                masked = -(tok * valid)
                batches.append((float(masked.sum()), int(valid.sum())))
                per_example += [(float(r), int(n)) for r, n in zip(masked.sum(dim=1), valid.sum(dim=1))]
                bar.update(len(chunk))
        bar.close()
        return NllResult(
            nll_sum=float(sum(b for b, _ in batches)),
            tokens=sum(n for _, n in batches),
            per_example=per_example,
            batches=batches,
        )

    def next_token_argmax(
        self, prompts: Sequence[GenRequest], task_id: int | None = None, desc: str = "scoring"
    ) -> list[int]:
        """Greedy next token after each prompt (= ``generate(max_new_tokens=1)``), via the scoring path."""
        torch = self.torch
        order: dict[tuple[Any, tuple[int, ...]], int] = {}
        groups: dict[tuple[Any, tuple[int, ...]], Hashable] = {}
        keys = []
        for p in prompts:
            key = (task_id if p.task_id is None else p.task_id, tuple(p.prompt))
            keys.append(key)
            order.setdefault(key, len(order))
            groups.setdefault(key, p.group)
        by_group: dict[tuple[Hashable, Any], list[tuple[int, ...]]] = {}
        for tid, prompt in order:
            by_group.setdefault((groups[tid, prompt], tid), []).append(prompt)
        best: dict[tuple[Any, tuple[int, ...]], int] = {}
        bar = self._bar(len(order), desc)
        with torch.inference_mode():
            for (_, tid), members in by_group.items():
                plen = self._prefix_len(members, [len(m) - 1 for m in members])
                state = self._prefix_state(list(members[0][:plen]), tid)
                for chunk, batch, width in self._suffix_batches(members, plen):
                    keep = width - min(len(m) - plen for m in chunk) + 1
                    logits, _ = self._forward(
                        batch.to(self.device),
                        cache=self._expanded_cache(state, len(chunk)),
                        task_id=tid,
                        keep=keep,
                    )
                    offset = width - logits.shape[1]
                    for i, m in enumerate(chunk):
                        best[tid, m] = int(logits[i, len(m) - plen - 1 - offset].float().argmax())
                    bar.update(len(chunk))
        bar.close()
        return [best[k] for k in keys]

    def _suffix_batches(self, members: Sequence[tuple[int, ...]], plen: int) -> Any:
        """Longest-first batches of the prompts' suffixes after a shared ``plen``-token prefix, right-padded.

        Yields ``(chunk, batch, width)``; shared by log-likelihood scoring and next-token prediction.
        """
        import torch

        ordered = sorted(members, key=lambda m: -len(m))
        for start in range(0, len(ordered), self.batch_size):
            chunk = ordered[start : start + self.batch_size]
            width = max(len(m) - plen for m in chunk)
            batch = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for i, m in enumerate(chunk):
                batch[i, : len(m) - plen] = torch.tensor(m[plen:], dtype=torch.long)
            yield chunk, batch, width

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        requests: Sequence[GenRequest],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        task_id: int | None = None,
        desc: str = "generating",
    ) -> list[Generation]:
        """Greedy decoding of up to ``max_new_tokens`` per prompt, with continuous batching.

        A row ends at an EOS id (``self.eos_ids``: by default tokenizer + generation config, as HF ``generate``), when its decoded text
        contains a stop sequence, or at the length limit. Finished rows leave the batch and waiting prompts
        take their places (their prompt is encoded on top of the shared prefix and their key/value columns
        are merged into the running cache; masked columns and explicit position ids keep every row's view
        identical to running alone). The returned text is *not* cut at the stop sequence.
        """
        results: list[Generation | None] = [None] * len(requests)
        by_group: dict[tuple[Hashable, Any], list[int]] = {}
        for i, r in enumerate(requests):
            if not r.prompt:
                raise ValueError("empty prompt")
            by_group.setdefault((r.group, task_id if r.task_id is None else r.task_id), []).append(i)
        stop = [s for s in stop if s]
        tail = 2 * max((len(s) for s in stop), default=0) + 6
        bar = self._bar(len(requests), desc)
        with self.torch.inference_mode():
            for (_, tid), members in by_group.items():
                seqs = [requests[i].prompt for i in members]
                plen = self._prefix_len(seqs, [len(s) - 1 for s in seqs])
                state = self._prefix_state(list(seqs[0][:plen]), tid)
                pending = sorted(members, key=lambda i: -len(requests[i].prompt))
                self._generate_group(
                    requests, pending, plen, state, max_new_tokens, stop, tail, tid, results, bar
                )
        bar.close()
        return [g for g in results if g is not None]

    def _generate_group(
        self,
        requests: Sequence[GenRequest],
        pending: list[int],
        plen: int,
        state: list[tuple[Any, Any]] | None,
        max_new_tokens: int,
        stop: list[str],
        tail: int,
        task_id: int | None,
        results: list[Generation | None],
        bar: Any,
    ) -> None:
        torch = self.torch
        generated: dict[int, list[int]] = {}
        active: _Rows | None = None
        refill_at = max(1, self.batch_size // 4)  # free slots that justify one extra prefill forward

        def advance(rows: _Rows, logits: Any) -> _Rows | None:
            """Append each row's greedy token and finish rows. Finished rows stay in the batch (their output
            is ignored) until ``refill_at`` of them have piled up: dropping rows copies the whole cache."""
            tokens = logits[:, -1].float().argmax(dim=-1).tolist()
            for b, row in enumerate(rows.ids):
                if rows.done[b]:
                    continue
                t = int(tokens[b])
                out = generated.setdefault(row, [])
                finish = None
                if t in self.eos_ids:
                    finish = "eos"
                else:
                    out.append(t)
                    if stop and self._hit_stop(out, stop, tail):
                        finish = "stop"
                    elif len(out) >= max_new_tokens:
                        finish = "length"
                if finish is None:
                    rows.last[b] = t
                else:
                    rows.done[b] = True
                    results[row] = Generation(tokens=out, text=self.decode(out), finish=finish)
                    bar.update(1)
            n_done = sum(rows.done)
            if n_done == rows.size:
                return None
            if n_done >= refill_at or (n_done and not pending):
                return rows.select([b for b in range(rows.size) if not rows.done[b]], torch)
            return rows

        while pending or active is not None:
            free = self.batch_size - (active.size if active is not None else 0)
            if pending and (active is None or free >= min(refill_at, len(pending))):
                take, pending = pending[:free], pending[free:]
                fresh, logits = self._prefill([requests[i].prompt for i in take], take, plen, state, task_id)
                fresh = advance(fresh, logits)
                active = _Rows.merge(active, fresh, torch)
                continue
            assert active is not None
            active.mask = torch.cat([active.mask, torch.ones_like(active.mask[:, :1])], dim=1)
            cache = _make_cache(active.kv)
            logits, cache = self._forward(
                torch.tensor(active.last, dtype=torch.long, device=self.device).unsqueeze(1),
                cache=cache,
                attention_mask=active.mask,
                position_ids=active.next_pos.unsqueeze(1),
                task_id=task_id,
            )
            active.kv = _cache_tensors(cache)
            active.next_pos = active.next_pos + 1
            active = advance(active, logits)

    def _prefill(
        self,
        prompts: list[list[int]],
        rows: list[int],
        plen: int,
        state: list[tuple[Any, Any]] | None,
        task_id: int | None,
    ) -> tuple[_Rows, Any]:
        """Encode prompts on top of the shared prefix: ``[prefix | masked padding | suffix]``."""
        torch = self.torch
        dev = self.device
        n = len(prompts)
        width = max(len(p) - plen for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, plen + width), dtype=torch.long)
        mask[:, :plen] = 1
        pos = torch.full((n, width), plen, dtype=torch.long)
        for i, p in enumerate(prompts):
            suffix = p[plen:]
            pad = width - len(suffix)
            ids[i, pad:] = torch.tensor(suffix, dtype=torch.long)
            mask[i, plen + pad :] = 1
            pos[i, pad:] = torch.arange(plen, plen + len(suffix))
        mask, pos = mask.to(dev), pos.to(dev)
        logits, cache = self._forward(
            ids.to(dev),
            cache=self._expanded_cache(state, n),
            attention_mask=mask,
            position_ids=pos,
            task_id=task_id,
            keep=1,
        )
        return _Rows(
            ids=list(rows), kv=_cache_tensors(cache), mask=mask, next_pos=pos[:, -1] + 1, last=[0] * n
        ), logits

    def _hit_stop(self, tokens: list[int], stop: list[str], tail: int) -> bool:
        text = self.decode(tokens[-tail:])
        if not any(s in text for s in stop):
            return False
        full = self.decode(tokens)
        return any(s in full for s in stop)


@dataclass
class _Rows:
    """Running generation rows: their key/value columns (masked where unused) and next positions."""

    ids: list[int]  # request index of each batch row
    kv: list[tuple[Any, Any]]  # per layer (B, heads, columns, dim)
    mask: Any  # (B, columns) 1 = real token
    next_pos: Any  # (B,) position id of the next token
    last: list[int]  # last generated token (fed at the next step)
    done: list[bool] = field(default_factory=list)  # finished rows not yet dropped

    def __post_init__(self) -> None:
        if not self.done:
            self.done = [False] * len(self.ids)

    @property
    def size(self) -> int:
        return len(self.ids)

    def select(self, keep: list[int], torch: Any) -> _Rows:
        if len(keep) == len(self.ids):
            return self
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        rows = _Rows(
            ids=[self.ids[b] for b in keep],
            kv=[(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv],
            mask=self.mask.index_select(0, idx),
            next_pos=self.next_pos.index_select(0, idx),
            last=[self.last[b] for b in keep],
            done=[self.done[b] for b in keep],
        )
        return rows.compact()

    def compact(self) -> _Rows:
        """Drop key/value columns no remaining row attends to (left behind by finished rows)."""
        used = self.mask.bool().any(dim=0)
        if bool(used.all()):
            return self
        self.kv = [(k[:, :, used], v[:, :, used]) for k, v in self.kv]
        self.mask = self.mask[:, used]
        return self

    @staticmethod
    def merge(a: _Rows | None, b: _Rows | None, torch: Any) -> _Rows | None:
        """Stack two row sets; the shorter one gets masked zero columns on the right (order is kept)."""
        if a is None or b is None:
            return a if b is None else b
        cols = max(a.mask.shape[1], b.mask.shape[1])

        def pad(x: Any, dim: int) -> Any:
            missing = cols - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x, x.new_zeros(shape)], dim=dim)

        kv = [
            (torch.cat([pad(ka, 2), pad(kb, 2)]), torch.cat([pad(va, 2), pad(vb, 2)]))
            for (ka, va), (kb, vb) in zip(a.kv, b.kv)
        ]
        return _Rows(
            ids=a.ids + b.ids,
            kv=kv,
            mask=torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
            next_pos=torch.cat([a.next_pos, b.next_pos]),
            last=a.last + b.last,
            done=a.done + b.done,
        ).compact()


def _cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer (key, value) tensors of a transformers cache (new ``layers`` API or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "to_legacy_cache"):
        return [tuple(kv[:2]) for kv in cache.to_legacy_cache()]
    return [tuple(kv[:2]) for kv in cache]


def _make_cache(kv: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=kv)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(kv))
