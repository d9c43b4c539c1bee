"""`MtLoraConfig`: one configuration dataclass for every method (lora, hydralora, mmoelora, mtlora).

Field names are the paper's command-line flags, so ``python train.py --lora_rank 16 --enable_blc ...`` maps
one-to-one onto this dataclass (it is also the schema of ``HfArgumentParser``). The class subclasses
peft's ``PeftConfig`` so the saved ``adapter_config.json`` has peft's usual keys (``peft_type``,
``base_model_name_or_path``, ``task_type`` ...); ``peft_type`` is ``"MTLORA"`` (peft's ``PeftType`` enum is
closed, see README "peft integration"). The saved file spells it :data:`SAVED_PEFT_TYPE`, ``"MTLORA: ..."``
followed by which mtlora call loads the folder: peft's loaders fail on an unknown type with
``KeyError(<peft_type>)``, so the value is the message a user of plain peft / lm-eval / transformers sees.

Method semantics
----------------
``lora``       one expert (E=1), no router: plain LoRA on ``target_modules`` (component level).
``hydralora``  E experts sharing one A, token-level scalar softmax router, component level. The paper's
               baseline of every table. mtLoRA-only flags are rejected (use ``mtlora``).
``mmoelora``   task-id gated experts: the rank is split across ``expert_num`` experts and a task embedding
               gives one gate per sample (needs ``task_ids`` in the batch, also at evaluation).
               ``mmoelora_general_task`` adds the released extra "general" task row, used without task ids.
``mmoeloras``  the released MMoELoRA variant: accepted as a method name and stored as ``mmoelora`` with
               ``mmoelora_general_task=True`` (its forward is the same; its default task id is the general one).
``adalora``    peft's AdaLoRA (SVD-parameterised LoRA with rank allocation) on ``target_modules``; trained by
               :mod:`mtlora.training.adalora` and saved as a plain peft adapter (it is not an MtLoraModel).
``mtlora``     HydraLoRA plus whatever of the three designs is switched on by flag, exactly like the paper's
               ``--method mtlora`` (which enables nothing by itself): ``--enable_block_adapter``,
               ``--enable_spectral_reg``, ``--enable_fine_grained_routing``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from peft.config import PeftConfig

from mtlora.errors import ConfigError
from mtlora.routing import Router, router_class


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, as data: the one place that maps method names to routers and rules.

    ``router``: the :data:`mtlora.routing.REGISTRY` key of its router; ``experts_field``: the config field that
    holds its number of experts (None: one expert, ``lora_nums`` is forced to 1); ``baseline``: the mtLoRA
    designs (``_MTLORA_ONLY``) are refused; ``peft_native``: trained and saved by peft itself (AdaLoRA), not an
    :class:`~mtlora.model.MtLoraModel`, so it has no mtlora experts or router.
    """

    router: str
    experts_field: str | None
    baseline: bool
    peft_native: bool = False


METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec(router="none", experts_field=None, baseline=True),
    "hydralora": MethodSpec(router="token", experts_field="lora_nums", baseline=True),
    "mmoelora": MethodSpec(router="task", experts_field="expert_num", baseline=True),
    "mtlora": MethodSpec(router="token", experts_field="lora_nums", baseline=False),
    "adalora": MethodSpec(router="none", experts_field=None, baseline=True, peft_native=True),
}
METHODS = tuple(METHOD_SPECS)
#: Method names accepted on the command line and stored under another name (see the module docstring).
METHOD_ALIASES = {"mmoeloras": "mmoelora"}
BLOCK_TYPES = ("attention", "ffn", "both")
BLOCK_STYLES = ("lowrank", "bottleneck", "adaptformer")
SPECTRAL_MODES = ("spectral", "paper", "uniform")
PEFT_TYPE = "MTLORA"
#: ``peft_type`` as written to ``adapter_config.json``: peft reports an unknown type as ``KeyError(value)``
#: (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, lm-eval's ``peft=``), so the value says
#: what the folder is and which call loads it. Readers accept any value whose part before ":" is MTLORA.
SAVED_PEFT_TYPE = (
    "MTLORA: an mtlora multi-task adapter, which peft cannot load. Load it with "
    "mtlora.hub.load_model(None, ADAPTER_DIR) (base model + adapter + tokenizer) or "
    "mtlora.MtLoraModel.from_pretrained(base_model, ADAPTER_DIR); for plain peft LoRAs per task run "
    "mtlora export ADAPTER_DIR --output_dir OUT"
)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Flags that only make sense for the mtLoRA method (rejected for the baselines).
_MTLORA_ONLY = ("enable_block_adapter", "enable_spectral_reg", "enable_fine_grained_routing")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class MtLoraConfig(PeftConfig):
    """Configuration of a multi-task LoRA adapter. See the module docstring for the methods."""

    method: str = _help(
        "Adapter method: lora | hydralora | mmoelora | mtlora | mmoeloras (mmoelora with the general task id) | "
        "adalora (peft's AdaLoRA) (train.py also takes lorahub: one LoRA per task, composed per task with "
        "LoRAHub).",
        default="mtlora",
    )
    lora_rank: int = _help("Rank r of the shared down-projection A (and of each B_i).", default=16)
    lora_alpha: float = _help(
        "LoRA alpha; the adapter output is scaled by lora_alpha / lora_rank.", default=64.0
    )
    lora_nums: int = _help(
        "Number of experts E (up-projections B_i). Forced to 1 for method=lora.", default=16
    )
    lora_dropout: float = _help("Dropout on the input of A (the router sees the clean input).", default=0.05)
    target_modules: list[str] | str | None = _help(
        "Component level: names of the nn.Linear modules to adapt (a module is adapted if its qualified name "
        "equals or ends with '.'+name). Comma-separated string or list. None = architecture default "
        "(q_proj,v_proj; qkv_proj for Phi-3). Ignored (with an error if set explicitly) at block level.",
        default=None,
    )
    enable_blc: bool = _help(
        "Add the load-balancing loss (cv^2 of mean routing probabilities).", default=False
    )
    blc_alpha: float = _help("Weight of the balance loss.", default=0.01)
    blc_ignore_padding: bool = _help(
        "Average routing probabilities over real tokens only (attention_mask). False = the paper's average "
        "over all positions including padding.",
        default=True,
    )
    enable_block_adapter: bool = _help(
        "Block-level adaptation: a parallel low-rank path over the whole attention and/or MLP block, "
        "x' = x + F(LN(x)) + Delta(LN(x)), instead of adapting component linears.",
        default=False,
    )
    block_adapter_type: str = _help(
        "Which blocks get the parallel path: attention | ffn | both.", default="ffn"
    )
    block_adapter_style: str = _help(
        "lowrank (paper default: B A x), bottleneck (B ReLU(A x)) or adaptformer (sum_e pi_e s_e B_e ReLU(A x) "
        "with learnable per-expert scales s_e and no alpha/r: the released MoEAdaptFormerBlockAdapter).",
        default="lowrank",
    )
    block_adapter_rank: int | None = _help("Rank of block adapters; None = lora_rank.", default=None)
    enable_spectral_reg: bool = _help(
        "Spectral-aware regularization of the experts' B matrices.", default=False
    )
    spectral_reg_lambda: float = _help("Weight lambda of the spectral regularizer.", default=0.25)
    spectral_reg_mode: str = _help(
        "spectral (default): weights w(sigma) of the current B applied in its own singular basis (an r x r "
        "eigh every step; see --spectral_reg_refresh_steps), term added on every step. paper: the released "
        "code exactly (coordinate-indexed weights, 64 sampled matrices, added only on trigger micro-batches). uniform: the "
        "uniform orthogonality term the paper argues against (w = 1: ||B^T B - s^2 I||_F^2, every step), for "
        "ablations such as Figure 1A.",
        default="spectral",
    )
    spectral_reg_frequency: int = _help(
        "paper mode without spectral_reg_steps: trigger every N epochs (as released: at step 0, a no-op).",
        default=1,
    )
    spectral_reg_steps: int | None = _help(
        "paper mode: trigger at global steps N-1, 2N-1, ... (the released meaning). No effect in the spectral "
        "and uniform modes (a note says so).",
        default=None,
    )
    spectral_reg_refresh_steps: int | None = _help(
        "spectral mode, opt-in: reuse each B's weights W for N optimizer steps instead of recomputing them from "
        "the current B at every step (None). W is never taken from an all-zero B.",
        default=None,
    )
    spectral_reg_max_matrices: int | None = _help(
        "Sample at most this many B matrices per evaluation (paper mode: 64; spectral mode: None = all).",
        default=None,
    )
    enable_fine_grained_routing: bool = _help(
        "Fine-grained routing: the router gives one weight per expert per group of routing_group_size "
        "output dimensions instead of one scalar per expert.",
        default=False,
    )
    routing_group_size: int | None = _help(
        "Output dimensions per routing group (G = d_out / routing_group_size; must divide d_out). "
        "None = d_out // 2 (G=2, the paper's main setting).",
        default=None,
    )
    router_top_k: int | None = _help(
        "Keep only the top-k experts per token (and group); None = dense.", default=None
    )
    task_num: int | None = _help("mmoelora: number of tasks (None = from the data's task map).", default=None)
    task_embedding_dim: int = _help("mmoelora: task embedding size.", default=64)
    expert_num: int = _help("mmoelora: number of experts the rank is split across.", default=4)
    bottleneck_init: str = _help(
        "bottleneck style B init: zeros (adapted model equals base at init) or paper (N(0, 0.02^2)).",
        default="zeros",
    )
    adaptformer_init_scale: float = _help(
        "adaptformer style: initial value of the per-expert scales s_e. 0.1 by default (B starts at zero, so the "
        "adapted model equals the base at init and B still gets gradients); the released default 0.0 is a dead "
        "saddle where every gradient is exactly zero.",
        default=0.1,
    )
    mmoelora_general_task: bool = _help(
        "mmoelora: the released task embedding with task_num + 1 rows; the extra 'general' id task_num is used "
        "whenever no task id is given (training with task ids never updates it). Set by --method mmoeloras.",
        default=False,
    )
    modules_to_save: list[str] | str | None = _help(
        "Names of base-model modules (e.g. embed_tokens,lm_head) trained in full and saved with the adapter "
        "(matched like target_modules). Comma-separated string or list.",
        default=None,
    )
    adapter_dtype: str = _help(
        "dtype of the trainable adapter parameters (kept fp32 under autocast).", default="float32"
    )

    def __post_init__(self) -> None:
        self.peft_type = PEFT_TYPE  # type: ignore[assignment]
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"  # type: ignore[assignment]
        super().__post_init__()
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [t.strip() for t in self.modules_to_save.split(",") if t.strip()] or None
        if self.method == "mmoeloras":  # the released variant = mmoelora + the general task id
            self.method, self.mmoelora_general_task = "mmoelora", True
        spec = METHOD_SPECS.get(self.method)  # an unknown method is reported by validate()
        if spec is not None and spec.experts_field is None:
            self.lora_nums = 1
        if (
            self.enable_spectral_reg
            and self.spectral_reg_mode == "paper"
            and self.spectral_reg_max_matrices is None
        ):
            self.spectral_reg_max_matrices = 64
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the offending field for any inconsistent setting."""

        def bad(name: str, msg: str) -> None:
            raise ConfigError(f"invalid adapter config: {name}={getattr(self, name)!r}: {msg}")

        for f in fields(self):  # NaN passes every "<= 0" test below, so non-finite numbers go first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f.name, "must be a finite number")
        if self.method not in METHODS:
            bad("method", f"must be one of {', '.join(METHODS)}")
        for name in ("lora_rank", "lora_nums", "expert_num", "task_embedding_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if self.block_adapter_rank is not None and (
            not isinstance(self.block_adapter_rank, int) or self.block_adapter_rank < 1
        ):
            bad("block_adapter_rank", "must be a positive integer or None")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if float(self.lora_alpha) <= 0:
            bad("lora_alpha", "must be > 0")
        if float(self.blc_alpha) < 0:
            bad("blc_alpha", "must be >= 0")
        if float(self.spectral_reg_lambda) < 0:
            bad("spectral_reg_lambda", "must be >= 0")
        if self.block_adapter_type not in BLOCK_TYPES:
            bad("block_adapter_type", f"must be one of {', '.join(BLOCK_TYPES)}")
        if self.block_adapter_style not in BLOCK_STYLES:
            bad("block_adapter_style", f"must be one of {', '.join(BLOCK_STYLES)}")
        if self.spectral_reg_mode not in SPECTRAL_MODES:
            bad("spectral_reg_mode", f"must be one of {', '.join(SPECTRAL_MODES)}")
        if self.bottleneck_init not in ("zeros", "paper"):
            bad("bottleneck_init", "must be zeros or paper")
        if self.spectral_reg_frequency < 1:
            bad("spectral_reg_frequency", "must be >= 1")
        if self.spectral_reg_steps is not None and self.spectral_reg_steps < 1:
            bad("spectral_reg_steps", "must be >= 1 or None")
        if self.spectral_reg_refresh_steps is not None:
            if self.spectral_reg_refresh_steps < 1:
                bad("spectral_reg_refresh_steps", "must be >= 1 or None")
            if self.spectral_reg_mode != "spectral":
                bad(
                    "spectral_reg_refresh_steps",
                    f"only applies to --spectral_reg_mode spectral (mode is {self.spectral_reg_mode})",
                )
        if self.spectral_reg_max_matrices is not None and self.spectral_reg_max_matrices < 1:
            bad("spectral_reg_max_matrices", "must be >= 1 or None")
        if self.routing_group_size is not None and self.routing_group_size < 1:
            bad("routing_group_size", "must be a positive integer or None")
        if self.router_top_k is not None and not 1 <= self.router_top_k <= self.num_experts:
            bad("router_top_k", f"must be in [1, {self.num_experts}] (number of experts)")
        if self.adapter_dtype not in ("float32", "bfloat16", "float16"):
            bad("adapter_dtype", "must be float32, bfloat16 or float16")
        spec = self.method_spec
        if spec.baseline:
            for name in _MTLORA_ONLY:
                if getattr(self, name):
                    bad(
                        name, f"is an mtLoRA design; method={self.method} is a baseline (use --method mtlora)"
                    )
        self.router_class.validate_config(self, bad)  # e.g. the task gate's rank split, no balance loss
        if spec.peft_native:
            for name in ("enable_blc", "router_top_k"):
                if getattr(self, name):
                    bad(name, f"{self.method} has no experts or router")
        if self.enable_block_adapter and self.target_modules:
            bad(
                "target_modules",
                "block-level adaptation replaces component adapters; do not set target_modules",
            )
        if self.enable_blc and self.num_experts == 1:
            bad("enable_blc", "the balance loss needs more than one expert (lora_nums > 1)")
        if self.enable_fine_grained_routing and self.num_experts == 1:
            bad("enable_fine_grained_routing", "routing needs more than one expert (lora_nums > 1)")

    # ------------------------------------------------------------------ derived properties
    @property
    def method_spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def num_experts(self) -> int:
        field_name = self.method_spec.experts_field
        return 1 if field_name is None else int(getattr(self, field_name))

    @property
    def router_class(self) -> type[Router]:
        """The router class every adapter of this config gets (:func:`mtlora.routing.router_class`)."""
        return router_class(self)

    @property
    def router_kind(self) -> str:
        """``none`` | ``token`` (scalar or fine-grained) | ``task`` (mmoelora): the router's registry key."""
        return self.router_class.kind

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.effective_rank

    @property
    def effective_rank(self) -> int:
        if self.enable_block_adapter and self.block_adapter_rank is not None:
            return self.block_adapter_rank
        return self.lora_rank

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, set):
                d[k] = sorted(v)
        d["peft_type"] = PEFT_TYPE
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> MtLoraConfig:
        """Build from a dict; unknown keys are an error naming the key (no silent drop)."""
        known = {f.name for f in fields(cls)}
        data = dict(data)
        peft_type = data.pop("peft_type", PEFT_TYPE)
        if str(peft_type).split(":", 1)[0].strip().upper() != PEFT_TYPE:
            raise ConfigError(
                f"{source}: peft_type={peft_type!r} is not an mtlora adapter (expected {PEFT_TYPE!r})"
            )
        data.pop("mtlora_version", None)
        data.pop("base_quantization", None)  # how the base was stored in training (mtlora.quant), not a flag
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> MtLoraConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: adapter config not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to parse") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))


# PeftConfig bookkeeping fields that are not user flags (hidden from --help, still accepted).
_HIDDEN_FLAGS = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)


def adapter_argument_parser(prog: str, **kwargs: Any) -> Any:
    """An ``HfArgumentParser`` over :class:`MtLoraConfig` with peft's bookkeeping fields hidden from --help."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(MtLoraConfig, prog=prog, **kwargs)
    for action in parser._actions:
        if any(opt.lstrip("-").replace("-", "_") in _HIDDEN_FLAGS for opt in action.option_strings):
            action.help = argparse.SUPPRESS
    return parser
