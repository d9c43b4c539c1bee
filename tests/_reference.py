"""Naive reference implementations the fused code is checked against (readable, slow, obviously right)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtlora.layers import MultiExpertLoRA


def naive_forward(m: MultiExpertLoRA, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert, per-group loop: y = scaling * sum_e repeat(pi_e, gs) * (B_e h), h = A x (dropout off)."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, m.in_features).float()
    h = x2 @ m.lora_A.float().T
    if m.style in ("bottleneck", "adaptformer"):
        h = F.relu(h)
    scales = m.expert_scales.float() if m.expert_scales is not None else torch.ones(m.num_experts)
    d_out = m.out_features
    y = torch.zeros(x2.shape[0], d_out, dtype=torch.float32)
    if m.router_kind == "none":
        y = (h @ m.lora_B.float().reshape(d_out, m.rank).T) * scales[0]
    elif m.router_kind == "task":
        emb = m.router.embedding.weight.float()[task_ids]
        gate = torch.softmax(emb @ m.router.gate.weight.float().T, dim=-1)  # (B, E)
        tokens = x2.shape[0] // task_ids.numel()
        rs = m.rank // m.num_experts
        for e in range(m.num_experts):
            g = gate[:, e].repeat_interleave(tokens)[:, None]
            y = y + g * (h[:, e * rs : (e + 1) * rs] @ m.expert_B(e).float().T)
    else:
        G, E = m.num_groups, m.num_experts
        logits = (x2 @ m.router.weight.float().T).view(-1, G, E)
        if m.router.top_k is not None:
            kth = logits.topk(m.router.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        pi = torch.softmax(logits, dim=-1)
        gs = d_out // G
        for e in range(E):
            out_e = (h @ m.expert_B(e).float().T) * scales[e]  # full d_out output of expert e
            weight = pi[:, :, e].repeat_interleave(gs, dim=-1)  # (N, d_out)
            y = y + weight * out_e
    return (y * m.scaling).reshape(*shape, d_out)


class ReleasedAdaptFormerBlockAdapter(torch.nn.Module):
    """Re-implementation of the released ``MoEAdaptFormerBlockAdapter`` (``peft/tuners/block_adapters.py``
    of doem97/ICLR26_mtLoRA @ 61dea0d; paper_code_spec.md section 5.3), written from the spec, loop for loop:

    ``hidden = ReLU(lora_A(dropout(x)))``; one expert: ``expert_scales[0] * lora_B[0](hidden)``; else
    ``route_weight = softmax(lora_route(x))`` (fp32, cast to x's dtype; FGR: viewed ``(..., G, E)`` and each
    group weight repeated over ``routing_group_size`` dims) and ``sum_i w_i * expert_scales[i] * lora_B[i](hidden)``
    starting from zeros. No alpha/r. ``last_blc`` = cv^2 of the mean routing weights (training only).
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        num_experts: int,
        enable_fine_grained_routing: bool = False,
        routing_group_size: int = 1,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        nn = torch.nn
        self.num_experts = num_experts
        self.enable_fine_grained_routing = enable_fine_grained_routing
        self.routing_group_size = routing_group_size
        self.lora_A = nn.Linear(dim, rank, bias=False)
        self.lora_B = nn.ModuleList([nn.Linear(rank, dim, bias=False) for _ in range(num_experts)])
        self.expert_scales = nn.ParameterList(
            [nn.Parameter(torch.full((1,), init_scale)) for _ in range(num_experts)]
        )
        self.num_groups = dim // routing_group_size if enable_fine_grained_routing else 1
        self.lora_route = (
            nn.Linear(dim, num_experts * self.num_groups, bias=False) if num_experts > 1 else None
        )
        self.last_blc: torch.Tensor | None = None

    def load_from(self, m: MultiExpertLoRA) -> ReleasedAdaptFormerBlockAdapter:
        """Copy the weights of an mtlora adaptformer adapter (same values in, as the other style checks do)."""
        with torch.no_grad():
            self.lora_A.weight.copy_(m.lora_A)
            for i in range(self.num_experts):
                self.lora_B[i].weight.copy_(m.lora_B[:, i, :])
                self.expert_scales[i].copy_(m.expert_scales[i : i + 1])
            if self.lora_route is not None:
                self.lora_route.weight.copy_(m.router.weight)
        return self

    @staticmethod
    def cv_squared(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.zeros((), dtype=x.dtype)
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.lora_A(x))
        if self.num_experts == 1:
            self.last_blc = None
            return self.expert_scales[0] * self.lora_B[0](hidden)
        logits = self.lora_route(x)
        result = torch.zeros_like(x)
        if self.enable_fine_grained_routing:
            logits = logits.view(*logits.shape[:-1], self.num_groups, self.num_experts)
            route = torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
            for i in range(self.num_experts):
                w = route[..., i].repeat_interleave(self.routing_group_size, dim=-1)
                result = result + w * (self.expert_scales[i] * self.lora_B[i](hidden))
            mean = route.mean(dim=tuple(range(route.dim() - 1)))
        else:
            route = torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
            for i in range(self.num_experts):
                result = result + route[..., i].unsqueeze(-1) * (
                    self.expert_scales[i] * self.lora_B[i](hidden)
                )
            mean = route.mean(dim=tuple(range(route.dim() - 1)))
        self.last_blc = self.cv_squared(mean) if self.training else None
        return result


# ------------------------------------------------------------------ the pre-issue-16 inference loops
# Verbatim (modulo imports) copies of the loops `mtlora.inference` replaced; tests/test_inference.py checks
# the new path against them (equal tokens / predictions, NLL and routing means within 1e-6).
IGNORE = -100


def old_encode(records, tokenizer, max_seq_length, template):
    from mtlora.data.tokenize import encode_record

    out = []
    for record in records:
        enc = encode_record(record, tokenizer, max_seq_length, template)
        if enc is not None:
            out.append((record, enc[0], enc[1]))
    return out


def old_right_padded(rows, pad_id, device):
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(labels)] = torch.tensor(labels)
        mask[i, : len(ids)] = 1
    return {"input_ids": ids_t.to(device), "labels": lab_t.to(device), "attention_mask": mask.to(device)}


def old_evaluate_records(
    model, tokenizer, records, *, forward_kwargs=None, max_seq_length=512, template="paper", batch_size=8,
    max_new_tokens=64, generate=True,
):  # fmt: skip
    """export.evaluate_records before issue 16: right-padded NLL + left-padded HF generate."""
    from mtlora.data.tokenize import resolve_pad_token_id

    encoded = old_encode(records, tokenizer, max_seq_length, template)
    if not encoded:
        return None, None, 0, 0
    device, pad = next(model.parameters()).device, resolve_pad_token_id(tokenizer)
    kw = dict(forward_kwargs or {})

    def row_kwargs(n):
        return {k: torch.full((n,), int(v), dtype=torch.long, device=device) for k, v in kw.items()}

    nll_sum, n_tok, correct = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = old_right_padded([(ids, lab) for _, ids, lab in chunk], pad, device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **row_kwargs(len(chunk))
            ).logits.float()
            labels = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            valid = labels != IGNORE
            tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            nll_sum += float(-(tok * valid).sum())
            n_tok += int(valid.sum())
            if not generate:
                continue
            prompts = []
            for _, ids, lab in chunk:
                first = next(i for i, v in enumerate(lab) if v != IGNORE)
                prompts.append((ids[:first], len(ids) - first))
            width = max(len(p) for p, _ in prompts)
            ids_t = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, (p, _) in enumerate(prompts):
                ids_t[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            new = min(max_new_tokens, max(n for _, n in prompts) + 2)
            out = model.generate(
                input_ids=ids_t.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False,
                num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **row_kwargs(len(prompts)),
            )  # fmt: skip
            for i, (record, _, _) in enumerate(chunk):
                gen = out[i, width:].tolist()
                if tokenizer.eos_token_id in gen:
                    gen = gen[: gen.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(gen, skip_special_tokens=True)
                correct += int(" ".join(text.split()) == " ".join(str(record["output"]).split()))
    acc = correct / len(encoded) if generate else None
    return acc, nll_sum / max(n_tok, 1), len(encoded), n_tok


def old_lorahub_losses(model, batches):
    """lorahub._NllProbe.losses before issue 16: (token-mean NLL, sum of per-batch token means)."""
    total, count, batch_means = 0.0, 0, 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            valid = labels != IGNORE
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            b_sum, b_count = float(-(tok * valid).sum()), int(valid.sum())
            total += b_sum
            count += b_count
            batch_means += b_sum / max(b_count, 1)
    return total / max(count, 1), batch_means


def old_generate_answers(
    model, tokenizer, records, *, device, batch_size=128, max_new_tokens=32, task_map=None
):
    """demo.generate_answers before issue 16: left-padded HF generate, length-sorted, per-row task ids."""
    from mtlora.data import encode_record

    def prompt_ids(record):
        ids, labels = encode_record(record, tokenizer, 1 << 30)
        return ids[: next(i for i, lab in enumerate(labels) if lab != IGNORE)]

    pad = tokenizer.pad_token_id
    stop = model.generation_config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [stop]) | {tokenizer.eos_token_id}
    prompts = [prompt_ids(r) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        kwargs = {}
        if task_map is not None:
            kwargs["task_ids"] = torch.tensor(
                [task_map[str(records[i]["task_type"])] for i in idx], device=device
            )
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, **kwargs,
            )  # fmt: skip
        for row, i in enumerate(idx):
            new = []
            for tok in out[row, width:].tolist():
                if tok in stop_ids:
                    break
                new.append(tok)
            answers[i] = tokenizer.decode(new, skip_special_tokens=True)
    return answers


def old_estimate_task_routing(
    model, tokenizer, records, *, max_seq_length=512, template="paper", batch_size=8
):
    """export.estimate_task_routing before issue 16: forward pre-hooks recomputing routing_probs, mask-weighted."""
    from mtlora.data.tokenize import resolve_pad_token_id

    routed = [(n, a) for n, a in model.named_adapters() if a.router.needs_calibration]
    encoded = old_encode(records, tokenizer, max_seq_length, template)
    sums, counts, current = {}, {}, {"mask": None}

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            batch_shape = tuple(x.shape[:-1])
            p = module.routing_probs(x.reshape(-1, module.in_features), batch_shape).double()
            mask = current["mask"]
            if mask is not None and tuple(mask.shape) == batch_shape:
                w = mask.reshape(-1).to(p)
            else:
                w = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
            s = (p * w[:, None, None]).sum(0)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0.0) + float(w.sum())

        return hook

    handles = [a.register_forward_pre_hook(make_hook(n)) for n, a in routed]
    device, pad, tokens = next(model.parameters()).device, resolve_pad_token_id(tokenizer), 0
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                batch = old_right_padded([(ids, lab) for _, ids, lab in chunk], pad, device)
                current["mask"] = batch["attention_mask"]
                tokens += int(batch["attention_mask"].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / max(counts[n], 1.0)).float().cpu() for n, _ in routed}, tokens
