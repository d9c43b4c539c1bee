"""LoRAHub: compose existing LoRAs for a target task from a few examples, without gradients.

LoRAHub (Huang et al., COLM'24; field survey §1.8) keeps a library of K LoRAs ``(A_k, B_k)`` and, for a new
task, searches weights ``w ∈ R^K`` for the element-wise composition

    A_w = Σ_k w_k A_k        B_w = Σ_k w_k B_k        Delta W = scaling · B_w A_w

minimising, by default, the original LoRAHub objective (``sail-sg/lorahub``, ``lorahub/algorithm.py``:
``default_get_loss`` + ``default_l1_regularization``)

    Σ_b CE_b / N  +  alpha · mean_k |w_k|        (alpha = 0.05)

where CE_b is the token-mean cross-entropy of the targets of batch b (what ``model(..., labels=...).loss``
returns) and N the number of examples, with a gradient-free optimiser (nevergrad ``NGOpt``, budget 40, bounds
[-1.5, 1.5], start at w = 0 = the base model). The original divides the sum of per-batch means by the number
of *examples*, not of batches; with its default (all examples in one batch, as here) the data term is the
token-mean CE / N. ``objective="token_nll_l1sum"`` keeps this module's earlier form, the token-mean NLL of
all examples + ``alpha · Σ_k |w_k|`` (the paper's formula; batch-independent). Why gradient-free: K is small
(tens), every evaluation is a few forward passes, and no backward pass or optimizer state is needed, so
composing costs about as much as running the examples ``budget`` times. The result is one ordinary peft
LoRA, servable anywhere.

Pieces:

* :func:`train_task_loras` - one plain ``lora`` per task of a records file with the library trainer,
  each converted to a peft LoRA (``X/loras/<task>/``);
* :func:`compose` - the weight search; :func:`save_composed` writes the composed peft LoRA +
  ``lorahub.json`` (weights, objective, history);
* :func:`run_lorahub_method` - ``mtlora train --method lorahub``: per-task LoRAs, then one composition per
  task from a few of its own training examples (``output_dir/lorahub/<task>/``) and a composed default
  from a few examples of every task (``output_dir/sft_lora_model/``, peft format);
* ``mtlora lorahub`` (:func:`main`) - compose given LoRA folders (or train them first) for one target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mtlora.atomic import atomic_dir, write_text_atomic
from mtlora.cli_args import progress_enabled
from mtlora.dtypes import model_device
from mtlora.errors import ConfigError, DataError, MtLoraError
from mtlora.export import (
    PeftLora,
    by_task,
    convert_lora_to_peft,
    read_peft_lora,
    safe_dir_name,
    write_peft_lora,
)
from mtlora.inference import Engine, Example, encode_examples
from mtlora.outputs import add_safety_flags, check_output_dir
from mtlora.quant import add_quantization_arguments
from mtlora.quant import from_args as quantization_from_args

if TYPE_CHECKING:
    from mtlora.config import MtLoraConfig
    from mtlora.training.arguments import DataArguments, ModelArguments, MtLoraTrainingArguments

__all__ = [
    "LoraHubResult",
    "combine_loras",
    "compose",
    "lorahub_train_argv",
    "main",
    "run_lorahub_method",
    "save_composed",
    "score_weights",
    "train_task_loras",
]

DEFAULT_ALPHA = 0.05
DEFAULT_BUDGET = 40
DEFAULT_BOUNDS = (-1.5, 1.5)
DEFAULT_EXAMPLES = 5
#: ``lorahub``: the original ``Σ_b CE_b / N + alpha · mean|w|``; ``token_nll_l1sum``: ``NLL + alpha · Σ|w|``.
OBJECTIVES = ("lorahub", "token_nll_l1sum")
DEFAULT_OBJECTIVE = "lorahub"
LORAHUB_JSON = "lorahub.json"


@dataclass
class LoraHubResult:
    """Outcome of one composition: the chosen weights and how they scored (``objective = loss + l1``).

    ``loss`` is the data term of ``objective_name`` and ``l1`` the penalty it adds; ``nll`` is always the
    token-mean NLL of all examples, so that compositions searched under either objective can be compared.
    """

    weights: list[float]
    objective: float
    nll: float
    l1: float
    lora_dirs: list[str]
    optimizer: str
    budget: int
    seed: int
    alpha: float
    num_examples: int
    objective_name: str = DEFAULT_OBJECTIVE
    loss: float = float("nan")
    batch_size: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ============================================================================ composition math
def _align(loras: Sequence[PeftLora]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, bool]:
    """Stack the K LoRAs per module: ``{path: (A (K, r, d_in), B (K, d_out, r))}``, common scaling, folded.

    A module missing from some LoRA is zero there (that LoRA does not change it), so LoRAs trained on
    different target sets still compose. Ranks must agree (element-wise sums need equal shapes). If the
    scalings differ, each B_k is pre-multiplied by its own scaling and the composition uses scaling 1.
    """
    if not loras:
        raise MtLoraError("LoRAHub needs at least one LoRA to compose")
    ranks = {lo.rank for lo in loras} | {int(a.shape[0]) for lo in loras for a, _ in lo.modules.values()}
    if len(ranks) != 1:
        raise MtLoraError(
            f"LoRAHub composes element-wise, so every LoRA needs the same rank; got {sorted(ranks)}"
        )
    scalings = {s for lo in loras for s in lo.scaling.values()}
    fold = len(scalings) != 1
    names = sorted({n for lo in loras for n in lo.modules})
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        shapes = {
            (tuple(lo.modules[name][0].shape), tuple(lo.modules[name][1].shape))
            for lo in loras
            if name in lo.modules
        }
        if len(shapes) != 1:
            raise MtLoraError(f"{name}: the LoRAs disagree on shapes {sorted(shapes)}; same base model?")
        (a_shape, b_shape) = shapes.pop()
        a_list, b_list = [], []
        for lo in loras:
            if name in lo.modules:
                a, b = lo.modules[name]
                b = b.float() * (lo.scaling[name] if fold else 1.0)
                a_list.append(a.float())
                b_list.append(b)
            else:
                a_list.append(torch.zeros(a_shape))
                b_list.append(torch.zeros(b_shape))
        stacked[name] = (torch.stack(a_list), torch.stack(b_list))
    return stacked, (1.0 if fold else scalings.pop()), fold


def combine_loras(loras: Sequence[PeftLora], weights: Sequence[float]) -> PeftLora:
    """The LoRAHub composition ``A = Σ w_k A_k``, ``B = Σ w_k B_k`` as one :class:`PeftLora`."""
    stacked, scaling, _ = _align(loras)
    if len(weights) != len(loras):
        raise MtLoraError(f"{len(weights)} weights for {len(loras)} LoRAs")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    modules = {
        n: (torch.einsum("k,kri->ri", w, a), torch.einsum("k,kor->or", w, b)) for n, (a, b) in stacked.items()
    }
    rank = next(iter(modules.values()))[0].shape[0]
    return PeftLora(modules=modules, scaling=dict.fromkeys(modules, scaling), rank=int(rank))


class _NllProbe:
    """The base model with one plain mtlora ``lora`` adapter whose weights are overwritten per candidate.

    Why not peft in the loop: reusing mtlora's own adapter keeps the probe one cheap ``copy_`` per module
    per evaluation, and :meth:`close` returns the untouched base model. The NLL comes from the shared
    inference engine (:meth:`mtlora.inference.Engine.target_nll`).
    """

    def __init__(
        self,
        base: Any,
        tokenizer: Any,
        stacked: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scaling: float,
    ) -> None:
        from mtlora.config import MtLoraConfig
        from mtlora.model import MtLoraModel

        rank = int(next(iter(stacked.values()))[0].shape[1])
        cfg = MtLoraConfig(
            method="lora",
            lora_rank=rank,
            lora_alpha=scaling * rank,
            lora_dropout=0.0,
            target_modules=sorted(stacked),
        )
        self.model = MtLoraModel(base, cfg).eval()
        adapters = dict(self.model.named_adapters())
        missing = sorted(set(stacked) - set(adapters))
        if missing or len(adapters) != len(stacked):
            self.model.unload()
            raise MtLoraError(f"the LoRAs target modules the model does not have as expected: {missing[:3]}")
        device = model_device(base)
        self.slots = [(adapters[n], a.to(device), b.to(device)) for n, (a, b) in stacked.items()]
        self.engine = Engine(self.model, tokenizer, device=device, progress=False)

    def set_weights(self, weights: Sequence[float]) -> None:
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=self.slots[0][1].device)
        with torch.no_grad():
            for adapter, a, b in self.slots:
                adapter.lora_A.copy_(torch.einsum("k,kri->ri", w, a).to(adapter.lora_A.dtype))
                adapter.lora_B.copy_(torch.einsum("k,kor->or", w, b).unsqueeze(1).to(adapter.lora_B.dtype))

    def losses(self, examples: Sequence[Example], batch_size: int) -> tuple[float, float]:
        """``(token-mean NLL of all targets, Σ over batches of each batch's token-mean CE)``.

        The second is the sum the original LoRAHub accumulates (``outputs.loss`` per batch of ``batch_size``
        consecutive examples); both come from one pass of :meth:`mtlora.inference.Engine.target_nll`.
        """
        self.engine.batch_size = batch_size
        result = self.engine.target_nll(examples)
        batch_means = sum(total / max(count, 1) for total, count in result.batches)
        return result.nll_sum / max(result.tokens, 1), batch_means

    def close(self) -> Any:
        return self.model.unload()


def objective_terms(
    objective: str, alpha: float, weights: Sequence[float], nll: float, batch_mean_sum: float, n: int
) -> tuple[float, float]:
    """``(loss, l1)`` of ``objective`` for one candidate; the searched value is ``loss + l1``.

    ``lorahub`` (the original ``get_score``): ``loss = Σ_b CE_b / n`` (n examples), ``l1 = alpha · mean|w|``.
    ``token_nll_l1sum``: ``loss = token-mean NLL``, ``l1 = alpha · Σ|w|``.
    """
    absum = sum(abs(float(x)) for x in weights)
    if objective == "lorahub":
        return batch_mean_sum / max(n, 1), alpha * absum / max(len(weights), 1)
    if objective == "token_nll_l1sum":
        return nll, alpha * absum
    raise MtLoraError(f"unknown LoRAHub objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


def _prepare(
    tokenizer: Any,
    loras: Sequence[str | Path | PeftLora],
    examples: Sequence[Mapping[str, Any]],
    max_seq_length: int,
    template: str,
    batch_size: int | None,
) -> tuple[
    list[str], list[PeftLora], dict[str, tuple[torch.Tensor, torch.Tensor]], float, list[Example], int
]:
    """LoRA folders, loaded LoRAs, stacked factors, scaling, the encoded examples and the batch size.

    Batches are consecutive chunks of ``batch_size`` examples (None: all in one batch, the original's
    default), i.e. the original's unshuffled ``DataLoader``; the ``lorahub`` objective depends on them.
    """
    if batch_size is not None and batch_size < 1:
        raise MtLoraError(f"--batch_size {batch_size}: must be >= 1")
    dirs = [str(x) for x in loras if not isinstance(x, PeftLora)]
    loaded = [x if isinstance(x, PeftLora) else read_peft_lora(x) for x in loras]
    stacked, scaling, _ = _align(loaded)
    encoded = encode_examples(examples, tokenizer, max_seq_length, template)
    if not encoded:
        raise MtLoraError("no usable example: give records whose target survives --max_seq_length")
    return dirs, loaded, stacked, scaling, encoded, batch_size or len(encoded)


def score_weights(
    base_model: Any,
    tokenizer: Any,
    loras: Sequence[str | Path | PeftLora],
    examples: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    *,
    objective: str = DEFAULT_OBJECTIVE,
    alpha: float = DEFAULT_ALPHA,
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int | None = None,
) -> dict[str, float]:
    """The objective of one weight vector, as :func:`compose` scores it: ``{objective, loss, l1, nll}``."""
    objective_terms(objective, alpha, [], 0.0, 0.0, 1)  # unknown objective: fail before loading anything
    _, loaded, stacked, scaling, encoded, size = _prepare(
        tokenizer, loras, examples, max_seq_length, template, batch_size
    )
    if len(weights) != len(loaded):
        raise MtLoraError(f"{len(weights)} weights for {len(loaded)} LoRAs")
    probe = _NllProbe(base_model, tokenizer, stacked, scaling)
    try:
        probe.set_weights(weights)
        nll, batch_sum = probe.losses(encoded, size)
    finally:
        probe.close()
    loss, l1 = objective_terms(objective, alpha, weights, nll, batch_sum, len(encoded))
    return {"objective": loss + l1, "loss": loss, "l1": l1, "nll": nll}


def compose(
    base_model: Any,
    tokenizer: Any,
    loras: Sequence[str | Path | PeftLora],
    examples: Sequence[Mapping[str, Any]],
    *,
    alpha: float = DEFAULT_ALPHA,
    budget: int = DEFAULT_BUDGET,
    lower: float = DEFAULT_BOUNDS[0],
    upper: float = DEFAULT_BOUNDS[1],
    seed: int = 0,
    optimizer: str = "NGOpt",
    max_seq_length: int = 512,
    template: str = "paper",
    batch_size: int | None = None,
    objective: str = DEFAULT_OBJECTIVE,
) -> tuple[LoraHubResult, PeftLora]:
    """Search composition weights for ``examples`` (records) and return (result, composed LoRA).

    ``base_model`` is a plain Hugging Face causal LM; it is wrapped for the search and handed back
    unchanged. The returned weights are nevergrad's recommendation, unless a point evaluated during the
    search scored strictly better (the objective is deterministic, so that point is a valid choice).
    ``objective`` is ``lorahub`` (the original, default) or ``token_nll_l1sum`` (see :func:`objective_terms`).
    """
    ng = _nevergrad()
    _check_search(ng, budget, alpha, lower, upper, optimizer)
    objective_terms(objective, alpha, [], 0.0, 0.0, 1)  # unknown objective: fail before loading anything
    dirs, loaded, stacked, scaling, encoded, size = _prepare(
        tokenizer, loras, examples, max_seq_length, template, batch_size
    )
    history: list[dict[str, Any]] = []
    probe = _NllProbe(base_model, tokenizer, stacked, scaling)
    bar = tqdm(
        total=budget + 1, desc="lorahub search", unit="eval", disable=not progress_enabled(), leave=False
    )

    def evaluate(weights: list[float]) -> float:
        bar.update(1)
        probe.set_weights(weights)
        nll, batch_sum = probe.losses(encoded, size)
        loss, l1 = objective_terms(objective, alpha, weights, nll, batch_sum, len(encoded))
        value = loss + l1
        history.append({"weights": weights, "loss": loss, "l1": l1, "nll": nll, "objective": value})
        return value if math.isfinite(value) else 1e9

    try:
        chosen = _search(ng, evaluate, history, len(loaded), lower, upper, seed, optimizer, budget)
    finally:
        probe.close()
        bar.close()
    result = LoraHubResult(
        weights=list(chosen["weights"]),
        objective=chosen["objective"],
        nll=chosen["nll"],
        l1=chosen["l1"],
        lora_dirs=dirs,
        optimizer=optimizer,
        budget=budget,
        seed=seed,
        alpha=alpha,
        num_examples=len(encoded),
        objective_name=objective,
        loss=chosen["loss"],
        batch_size=batch_size,
        history=history,
    )
    return result, combine_loras(loaded, result.weights)


def _nevergrad() -> Any:
    try:
        import nevergrad as ng
    except ImportError:
        raise MtLoraError("LoRAHub needs nevergrad: pip install 'nevergrad>=1.0'") from None
    return ng


def _check_search(ng: Any, budget: int, alpha: float, lower: float, upper: float, optimizer: str) -> None:
    """The search settings, checked before anything is loaded."""
    if budget < 1:
        raise MtLoraError(f"--budget {budget}: must be >= 1")
    if alpha < 0:
        raise MtLoraError(f"--alpha {alpha}: must be >= 0")
    if not lower < 0 < upper:
        raise MtLoraError(f"bounds [{lower}, {upper}] must contain 0 (the search starts at w = 0)")
    if optimizer not in ng.optimizers.registry:
        raise MtLoraError(f"unknown nevergrad optimizer {optimizer!r} (e.g. NGOpt, CMA, TwoPointsDE)")


def _search(
    ng: Any,
    evaluate: Any,
    history: list[dict[str, Any]],
    k: int,
    lower: float,
    upper: float,
    seed: int,
    optimizer: str,
    budget: int,
) -> dict[str, Any]:
    """nevergrad's minimisation of ``evaluate`` from ``w = 0``; returns the chosen ``history`` entry.

    That is the recommendation (evaluated once more), unless a point seen during the search scored
    strictly better (the objective is deterministic, so that point is a valid choice).
    """
    import numpy as np

    def as_list(w: Any) -> list[float]:
        return [float(x) for x in np.asarray(w).reshape(-1)]

    param = ng.p.Array(init=np.zeros(k), lower=lower, upper=upper)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nevergrad/scipy sub-optimisers warn about their own settings
        recommendation = opt.minimize(lambda w: evaluate(as_list(w)))
    evaluate(as_list(recommendation.value))
    final = history[-1]
    best = min(history, key=lambda h: h["objective"])
    return best if best["objective"] < final["objective"] else final


def _target_modules(loras: Sequence[PeftLora], composed: PeftLora) -> list[str] | str:
    """The inputs' own ``target_modules`` if they all agree (usually short names such as q_proj, v_proj).

    A regex string (peft allows one) is kept as is; otherwise the composed module paths are listed.
    """
    keys = set()
    for lo in loras:
        t = lo.config.get("target_modules")
        keys.add(json.dumps(t if isinstance(t, str) else sorted(t or [])))
    if len(keys) == 1:
        found = json.loads(keys.pop())
        if found:
            return found
    return sorted(composed.modules)


def save_composed(
    out_dir: str | Path,
    composed: PeftLora,
    result: LoraHubResult,
    *,
    base_model_name_or_path: str | None = None,
    target_modules: Sequence[str] | str | None = None,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    task_map: Mapping[str, int] | None = None,
) -> Path:
    """Write the composed LoRA as a standard peft folder plus ``lorahub.json`` (weights and search log), and
    the tokenizer and task map when given -- all as one unit (:func:`mtlora.atomic.atomic_dir`)."""
    from mtlora.data import save_task_map

    scaling = next(iter(composed.scaling.values()))
    with atomic_dir(out_dir, keep_existing=True) as out:
        write_peft_lora(
            out,
            composed.modules,
            lora_alpha=scaling * composed.rank,
            target_modules=target_modules,
            base_model_name_or_path=base_model_name_or_path,
        )
        payload = {**result.to_dict(), **(extra or {})}
        (out / LORAHUB_JSON).write_text(json.dumps(payload, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        if task_map is not None:
            save_task_map(task_map, out / "task_map.json")
    return Path(out_dir)


# ============================================================================ per-task LoRAs
def _train_one(
    model_args: ModelArguments,
    data_args: DataArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
    records: Sequence[Mapping[str, Any]],
    task_dir: Path,
) -> Path:
    """Train a plain ``lora`` on ``records`` with the library trainer; write its peft form to ``task_dir``."""
    from mtlora.data import save_records
    from mtlora.training.run import train

    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / "train_records.json"
    save_records(records, data_file)
    run_dir = task_dir / "run"
    d_args = dataclasses.replace(data_args, train_file=str(data_file), dataset_dir=None, validation_file=None)
    t_args = dataclasses.replace(train_args, output_dir=str(run_dir))
    a_cfg = dataclasses.replace(adapter, method="lora", base_model_name_or_path=None)
    adapter_dir = train(model_args, d_args, a_cfg, t_args)
    if not t_args.should_save:  # a non-main process of a distributed run: rank 0 writes the files
        return task_dir
    return convert_lora_to_peft(adapter_dir, task_dir)


def train_task_loras(
    records: str | Path | Sequence[Mapping[str, Any]],
    model_name_or_path: str,
    output_dir: str | Path,
    *,
    train_argv: Sequence[str] = (),
    tasks: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Train one plain LoRA per task of ``records``; returns ``{task: peft folder}`` (``output_dir/<task>``).

    ``train_argv`` takes any ``mtlora train`` flag (``--max_steps``, ``--learning_rate``, ``--lora_rank`` ...);
    the method is always ``lora`` and checkpoints are off unless asked for.
    """
    from mtlora.data import load_records
    from mtlora.training.arguments import parse_train_args

    recs = load_records(records) if isinstance(records, (str, Path)) else list(records)
    grouped = by_task(recs)
    names = list(tasks) if tasks else sorted(grouped)
    unknown = [t for t in names if t not in grouped]
    if unknown:
        raise MtLoraError(f"tasks {unknown} have no records (found {sorted(grouped)})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    placeholder = str(out / "_unused")
    argv = ["--save_strategy", "no", *train_argv]
    argv += [  # the data and output paths are replaced per task (_train_one); these only pass the checks
        "--model_name_or_path",
        model_name_or_path,
        "--dataset_dir",
        str(out),
        "--output_dir",
        placeholder,
    ]
    argv += ["--method", "lora"]
    model_args, data_args, adapter, train_args = parse_train_args(argv, prog="mtlora lorahub")
    taken: set[str] = set()
    result = {}
    for t in names:
        try:
            result[t] = _train_one(
                model_args, data_args, adapter, train_args, grouped[t], out / safe_dir_name(t, taken)
            )
        except DataError as exc:  # e.g. every example of this task longer than --max_seq_length
            warnings.warn(f"lorahub: no LoRA for task {t!r}: {exc}", stacklevel=2)
    if not result:
        raise DataError("lorahub: no task had trainable examples (see the warnings above)")
    return result


# ============================================================================ `mtlora train --method lorahub`
def lorahub_train_argv(argv: Sequence[str]) -> list[str] | None:
    """For the training CLI: None unless the (effective) method is ``lorahub``; else argv with ``--method lora``.

    ``--config`` files are expanded first (flags after them win, as in ``parse_train_args``).
    """
    from mtlora.training.arguments import config_file_argv

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    ns, rest = pre.parse_known_args(list(argv))
    full = (config_file_argv(ns.config) if ns.config else []) + rest
    method, out = None, []
    i = 0
    while i < len(full):
        arg = full[i]
        if arg == "--method" and i + 1 < len(full):
            method = full[i + 1]
            out += ["--method", "lora" if method == "lorahub" else method]
            i += 2
            continue
        if arg.startswith("--method="):
            method = arg.split("=", 1)[1]
            out.append("--method=" + ("lora" if method == "lorahub" else method))
        else:
            out.append(arg)
        i += 1
    return out if method == "lorahub" else None


def run_lorahub_method(
    model_args: ModelArguments,
    data_args: DataArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
    *,
    examples_per_task: int = DEFAULT_EXAMPLES,
    budget: int = DEFAULT_BUDGET,
    alpha: float = DEFAULT_ALPHA,
    objective: str = DEFAULT_OBJECTIVE,
) -> Path:
    """``--method lorahub``: train per-task LoRAs, compose one LoRA per task and a default; returns the default.

    Layout::

        output_dir/lorahub/loras/<task>/      the per-task plain LoRAs (peft) and their training runs
        output_dir/lorahub/<task>/            composed for <task> from its first ``examples_per_task`` records
        output_dir/sft_lora_model/            composed from ``examples_per_task`` records of every task (peft)
        output_dir/lorahub/summary.json       weights and objectives of every composition
        output_dir/task_map.json

    ``adapter`` carries the LoRA flags (rank, alpha, target modules); its method is forced to ``lora``.
    """
    from mtlora.data import build_task_map, load_records, save_task_map
    from mtlora.training.run import load_base_model

    if data_args.validation_file:
        raise ConfigError("--method lorahub does not evaluate during training; drop --validation_file")
    out = Path(train_args.output_dir or "")
    if not str(out):
        raise ConfigError("--output_dir is required")
    records = load_records(data_args.train_file or data_args.dataset_dir)
    if data_args.max_train_samples is not None:  # >= 1, checked at parse time
        records = records[: data_args.max_train_samples]
    task_map = build_task_map(records)
    grouped = by_task(records)
    hub = out / "lorahub"
    taken: set[str] = set()
    task_dirs = {t: safe_dir_name(t, taken) for t in task_map}
    lora_dirs = _train_library(model_args, data_args, adapter, train_args, grouped, hub, task_dirs)
    if not train_args.should_save:  # not the main process of a distributed run
        return out / "sft_lora_model"
    model, tokenizer = load_base_model(model_args, train_args)
    model.eval()
    common: dict[str, Any] = dict(
        alpha=alpha,
        objective=objective,
        budget=budget,
        seed=train_args.seed,
        max_seq_length=data_args.max_seq_length,
        template=data_args.template,
    )
    per_task = {t: grouped[t][:examples_per_task] for t in lora_dirs}
    summary = _compose_all(
        model,
        tokenizer,
        lora_dirs,
        per_task,
        common,
        model_args.model_name_or_path,
        hub,
        task_dirs,
        out,
        task_map,
    )
    save_task_map(task_map, out / "task_map.json")
    write_text_atomic(hub / "summary.json", json.dumps(summary, indent=2) + "\n")
    return out / "sft_lora_model"


def _train_library(
    model_args: ModelArguments,
    data_args: DataArguments,
    adapter: MtLoraConfig,
    train_args: MtLoraTrainingArguments,
    grouped: Mapping[str, Sequence[Mapping[str, Any]]],
    hub: Path,
    task_dirs: Mapping[str, str],
) -> dict[str, Path]:
    """One plain LoRA per task (``hub/loras/<task>``); a task without trainable examples is skipped, loudly."""
    lora_dirs: dict[str, Path] = {}
    for t in task_dirs:
        try:
            lora_dirs[t] = _train_one(
                model_args, data_args, adapter, train_args, grouped[t], hub / "loras" / task_dirs[t]
            )
        except DataError as exc:  # e.g. every example of this task longer than --max_seq_length
            warnings.warn(f"lorahub: no LoRA for task {t!r}: {exc}", stacklevel=3)
    if not lora_dirs:
        raise DataError("lorahub: no task had trainable examples (see the warnings above)")
    return lora_dirs


def _compose_all(
    model: Any,
    tokenizer: Any,
    lora_dirs: Mapping[str, Path],
    per_task: Mapping[str, Sequence[Mapping[str, Any]]],
    common: Mapping[str, Any],
    base_name: str,
    hub: Path,
    task_dirs: Mapping[str, str],
    out: Path,
    task_map: Mapping[str, int],
) -> dict[str, Any]:
    """One composition per task (``hub/<task>``) and the default from every task's examples
    (``out/sft_lora_model``); returns the summary (weights and objectives of each)."""
    tasks_ok = list(lora_dirs)
    loras = [read_peft_lora(lora_dirs[t]) for t in tasks_ok]
    targets = _target_modules(loras, loras[0])
    summary: dict[str, Any] = {
        "task_map": dict(task_map),
        "lora_dirs": {t: str(p) for t, p in lora_dirs.items()},
        "tasks": {},
    }
    jobs = [(t, per_task[t], hub / task_dirs[t]) for t in tasks_ok]
    jobs.append((None, [r for t in tasks_ok for r in per_task[t]], out / "sft_lora_model"))
    for t, examples, target_dir in jobs:
        result, composed = compose(model, tokenizer, loras, examples, **common)
        result.lora_dirs = [str(lora_dirs[x]) for x in tasks_ok]
        default = t is None
        save_composed(
            target_dir,
            composed,
            result,
            base_model_name_or_path=base_name,
            target_modules=targets,
            tokenizer=tokenizer if default else None,
            extra={"task": t},
            task_map=task_map if default else None,
        )
        entry = {"dir": str(target_dir), "weights": result.weights, "objective": result.objective}
        if default:
            summary["default"] = entry
        else:
            summary["tasks"][t] = entry
    return summary


# ============================================================================ CLI
def build_parser(prog: str = "mtlora lorahub") -> argparse.ArgumentParser:
    from mtlora.cli_args import Parser, add_data, add_model, add_output, add_runtime

    p = Parser(
        prog=prog,
        description="LoRAHub: learn weights that compose K LoRAs for a target task from a few examples "
        "(gradient-free, nevergrad) and save the composition as a standard peft LoRA.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--loras", "--lora_dirs", dest="lora_dirs", help="comma-separated peft LoRA folders to compose"
    )
    src.add_argument(
        "--train_dataset",
        help="records file/dir: first train one plain LoRA per task (into OUTPUT/loras/<task>)",
    )
    p.add_argument(
        "--train_args",
        default="",
        help='extra `mtlora train` flags for --train_dataset, one string: --train_args="--max_steps 200"',
    )
    add_model(p, required=True)
    add_data(
        p,
        required=True,
        aliases=("--examples",),
        dest="examples",
        help="records file/dir with the target task's few-shot examples",
    )
    p.add_argument("--task", default=None, help="use only the examples whose task_type is TASK")
    p.add_argument(
        "--max_examples", type=int, default=DEFAULT_EXAMPLES, help="use the first N examples (LoRAHub: 5)"
    )
    add_output(p, help="where the composed peft LoRA, lorahub.json and (--train_dataset) loras/ go")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="objective evaluations (LoRAHub: 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimizer")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=DEFAULT_OBJECTIVE,
        help="lorahub (default): the original sail-sg/lorahub objective, sum of per-batch mean CE / number of "
        "examples + alpha*mean|w|; token_nll_l1sum: token-mean NLL + alpha*sum|w|",
    )
    p.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="L1 weight (mean|w| or sum|w|, see --objective)"
    )
    p.add_argument("--lower", type=float, default=DEFAULT_BOUNDS[0], help="lower bound of each weight")
    p.add_argument("--upper", type=float, default=DEFAULT_BOUNDS[1], help="upper bound of each weight")
    p.add_argument("--optimizer", default="NGOpt", help="nevergrad optimizer name (NGOpt, CMA, ...)")
    p.add_argument("--max_seq_length", type=int, default=512, help="tokens per example (longer are cut)")
    p.add_argument("--template", default="paper", choices=("paper", "chat"), help="prompt template")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="examples per forward pass (default: all in one batch, as the original; the lorahub "
        "objective sums per-batch means, so this changes its value)",
    )
    add_runtime(p, dtype_default="float32", dtype_choices=("float32", "bfloat16", "float16"))
    add_quantization_arguments(p)
    add_safety_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from mtlora.cli_args import apply_runtime
    from mtlora.data import load_records
    from mtlora.hub import load_model

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_examples < 1:
        raise MtLoraError("--max_examples must be >= 1")
    apply_runtime(args)
    quant = quantization_from_args(args)
    out = check_output_dir(
        args.output_dir, ["adapter_config.json", LORAHUB_JSON, "loras"], overwrite=args.overwrite_output_dir
    )
    if args.lora_dirs:
        dirs = [Path(d.strip()) for d in args.lora_dirs.split(",") if d.strip()]
    else:
        # the task LoRAs train on the same (quantized) base they are composed on; --train_args flags win
        quant_argv = [
            "--load_in_kbits", str(quant.load_in_kbits), "--double_quant", str(quant.double_quant),
            "--quant_type", quant.quant_type,
        ]  # fmt: skip
        trained = train_task_loras(
            args.train_dataset,
            args.model_name_or_path,
            out / "loras",
            train_argv=quant_argv + shlex.split(args.train_args),
        )
        dirs = list(trained.values())
        print(f"trained {len(dirs)} task LoRAs under {out / 'loras'}")
    examples = load_records(args.examples)
    if args.task is not None:
        examples = [r for r in examples if r["task_type"] == args.task]
        if not examples:
            raise MtLoraError(f"--task {args.task!r}: no example has this task_type in {args.examples}")
    examples = examples[: args.max_examples]
    loaded = load_model(
        args.model_name_or_path,
        device=args.device,
        dtype=args.dtype,
        quantization=quant,
        trust_remote_code=args.trust_remote_code,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    loras = [read_peft_lora(d) for d in dirs]
    result, composed = compose(
        model,
        tokenizer,
        loras,
        examples,
        alpha=args.alpha,
        budget=args.budget,
        lower=args.lower,
        upper=args.upper,
        seed=args.seed,
        optimizer=args.optimizer,
        max_seq_length=args.max_seq_length,
        template=args.template,
        batch_size=args.batch_size,
        objective=args.objective,
    )
    result.lora_dirs = [str(d) for d in dirs]
    save_composed(
        out,
        composed,
        result,
        base_model_name_or_path=args.model_name_or_path,
        target_modules=_target_modules(loras, composed),
        tokenizer=tokenizer,
        extra={"task": args.task, "examples_file": str(args.examples)},
    )
    for d, w in zip(dirs, result.weights):
        print(f"  {w:+.4f}  {d}")
    print(
        f"objective {result.objective:.4f} ({result.objective_name}: loss {result.loss:.4f} + l1 "
        f"{result.l1:.4f}; token-mean nll {result.nll:.4f}); saved to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
