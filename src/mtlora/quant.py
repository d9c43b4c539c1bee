"""Quantized base models (QLoRA): ``--load_in_kbits 4|8|16``, ``--double_quant``, ``--quant_type``.

Why one module: training, evaluation, analysis, LoRAHub and export all load a base model, and each must
turn the same three released flags into the same ``transformers.BitsAndBytesConfig``, fail with the same
one-line error when ``bitsandbytes`` is missing or cannot run, and describe the base the same way in the
saved adapter config. The flags keep the released ``train.py`` names and defaults (``load_in_kbits`` 16 =
not quantized, ``double_quant`` True, ``quant_type`` nf4); the released code accepted them but its LoRA
layers raised ``ImportError`` for 4/8-bit bases, so quantized training never ran there.

What a quantized base changes, and what it does not:

* only the frozen base linears are stored in 4 bit (NF4/FP4, optionally double-quantized statistics) or
  8 bit (LLM.int8); their matmuls run in the *compute dtype* (``--bf16``/``--fp16``/fp32 in training,
  ``--dtype`` elsewhere). Adapters stay in ``--adapter_dtype`` (fp32) and attach exactly as in 16 bit:
  ``bnb.nn.Linear4bit`` and ``bnb.nn.Linear8bitLt`` are ``nn.Linear`` subclasses whose output has the
  input's dtype, so component adapters and the ``base=`` accumulation path need nothing special, and block
  adapters read the block's (norm) input as always;
* for training, :func:`prepare_for_kbit_training` does what ``peft.prepare_model_for_kbit_training`` does
  (freeze the base, keep every non-quantized parameter - norms, embeddings, the LM head - in fp32), but
  leaves activation checkpointing to :class:`mtlora.model.MtLoraModel`, which keeps it non-reentrant: the
  reentrant variant peft would otherwise switch on drops the balance loss's gradient;
* the adapter weights do not depend on the base's storage: a saved adapter records the quantization it
  was trained with (``base_quantization`` in ``adapter_config.json``) and loads onto a base of any
  precision, saying so once when they differ.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any

from mtlora.errors import ConfigError, MtLoraError

__all__ = [
    "KBITS",
    "QUANT_TYPES",
    "Quantization",
    "add_quantization_arguments",
    "check_backend",
    "from_pretrained_kwargs",
    "is_quantized_linear",
    "prepare_for_kbit_training",
    "quantization_of",
]

KBITS = (4, 8, 16)
QUANT_TYPES = ("nf4", "fp4")
#: adapter_config.json key holding :meth:`Quantization.record` of the base the adapter was trained on.
RECORD_KEY = "base_quantization"
INSTALL_HINT = "pip install 'mtlora[qlora]' (or: pip install 'bitsandbytes>=0.43')"


@dataclass(frozen=True)
class Quantization:
    """How the frozen base is stored: the released flags, validated (errors name the flag)."""

    load_in_kbits: int = 16
    double_quant: bool = True
    quant_type: str = "nf4"

    def __post_init__(self) -> None:
        if self.load_in_kbits not in KBITS:
            raise ConfigError(
                f"--load_in_kbits {self.load_in_kbits!r}: use 4 (NF4/FP4), 8 (LLM.int8) or 16 (not quantized)"
            )
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"--quant_type {self.quant_type!r}: use nf4 or fp4")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"--double_quant {self.double_quant!r}: use True or False")

    @property
    def enabled(self) -> bool:
        return self.load_in_kbits != 16

    def record(self) -> dict[str, Any]:
        """What the adapter config stores: only the settings that shape this precision."""
        if self.load_in_kbits == 4:
            return {"load_in_kbits": 4, "quant_type": self.quant_type, "double_quant": self.double_quant}
        return {"load_in_kbits": self.load_in_kbits}

    def describe(self) -> str:
        """``4-bit nf4 + double quant`` / ``8-bit LLM.int8`` / ``16-bit (not quantized)``."""
        if self.load_in_kbits == 4:
            return f"4-bit {self.quant_type}" + (" + double quant" if self.double_quant else "")
        if self.load_in_kbits == 8:
            return "8-bit LLM.int8"
        return "16-bit (not quantized)"

    @classmethod
    def from_record(cls, data: Any, *, source: str = "adapter config") -> Quantization:
        """Inverse of :meth:`record` (a hand-edited record with a bad value names the file and the field)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {RECORD_KEY} must be an object like {{'load_in_kbits': 4}}")
        try:
            return cls(
                load_in_kbits=data.get("load_in_kbits", 16),
                double_quant=data.get("double_quant", True),
                quant_type=data.get("quant_type", "nf4"),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {RECORD_KEY}: {exc}") from None

    def bnb_config(self, compute_dtype: Any) -> Any:
        """The ``transformers.BitsAndBytesConfig`` of this setting (None when not quantized).

        ``llm_int8_threshold`` 6.0 is the LLM.int8 default the released script passes explicitly; the LM
        head is never quantized (transformers skips it), so the loss is computed from a full-precision head.
        """
        if not self.enabled:
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=self.load_in_kbits == 4,
            load_in_8bit=self.load_in_kbits == 8,
            llm_int8_threshold=6.0,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_quant_type=self.quant_type,
        )


def check_backend(quant: Quantization, device: str = "cpu") -> None:
    """Raise one clear error when ``bitsandbytes`` is missing or cannot quantize on ``device``.

    A tiny quantize/dequantize round trip on the target device is the only reliable test: bitsandbytes
    imports fine on machines where its kernels for that device are missing, and then fails deep inside
    model loading with a message that names neither the package's install command nor our flag.
    """
    if not quant.enabled:
        return
    flag = f"--load_in_kbits {quant.load_in_kbits}"
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MtLoraError(
            f"{flag} needs the bitsandbytes package ({exc}); install it: {INSTALL_HINT}"
        ) from None
    import torch

    try:
        x = torch.linspace(-1.0, 1.0, 256, device=device).reshape(4, 64)
        if quant.load_in_kbits == 4:
            packed, state = bnb.functional.quantize_4bit(
                x, quant_type=quant.quant_type, compress_statistics=quant.double_quant
            )
            back = bnb.functional.dequantize_4bit(packed, state)
        else:
            q, scale, _ = bnb.functional.int8_vectorwise_quant(x.half())
            back = bnb.functional.int8_vectorwise_dequant(q, scale)
        if back.shape != x.shape:
            raise RuntimeError(f"round trip changed the shape {tuple(x.shape)} -> {tuple(back.shape)}")
    except Exception as exc:  # bitsandbytes raises RuntimeError/NotImplementedError/its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
        raise MtLoraError(
            f"{flag}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run "
            f"{quant.describe()} on {device} ({first}); use --load_in_kbits 16 or a supported device"
        ) from None


class _FirstOccurrenceOnly(logging.Filter):
    """Let each distinct log message through once (bitsandbytes logs the same note on every 8-bit matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def _quiet_repeated_bnb_notes() -> None:
    """Keep bitsandbytes' per-call "MatMul8bitLt: inputs will be cast ... to float16" to one line per run.

    8-bit matmuls quantize their input from fp16, so with an fp32/bf16 compute dtype bitsandbytes logs that
    note on every call of every 8-bit linear: thousands of identical lines per step. The note is true and
    worth seeing once; a standard ``logging.Filter`` on bitsandbytes' own logger keeps the first of each.
    """
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOccurrenceOnly) for f in lg.filters):
        lg.addFilter(_FirstOccurrenceOnly())


def from_pretrained_kwargs(quant: Quantization, compute_dtype: Any, device: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a quantized base ({} when not quantized).

    The weights are quantized while loading onto ``device`` (``device_map``), as bitsandbytes requires:
    an 8-bit model cannot be moved with ``.to()`` afterwards, and moving a 4-bit one re-quantizes nothing.
    """
    if not quant.enabled:
        return {}
    check_backend(quant, device)
    if quant.load_in_kbits == 8:
        _quiet_repeated_bnb_notes()
    return {"quantization_config": quant.bnb_config(compute_dtype), "device_map": {"": device}}


def _bnb_classes() -> tuple[type, ...]:
    """bitsandbytes' quantized linear classes, without importing it when nobody has (nothing is quantized)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: Any) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear (its ``weight`` is packed, not a matrix)."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def quantization_of(model: Any) -> Quantization:
    """The storage of ``model``'s base linears, read from the modules themselves (not from flags).

    Reading the modules means a base quantized by hand, or loaded by another tool, is described correctly;
    a mix (which transformers never produces) is described by its first quantized linear.
    """
    classes = _bnb_classes()
    if not classes:
        return Quantization()
    for module in model.modules():
        if isinstance(module, classes[0]):
            weight = module.weight
            return Quantization(
                load_in_kbits=4,
                double_quant=bool(getattr(weight, "compress_statistics", False)),
                quant_type=str(getattr(weight, "quant_type", "nf4")),
            )
        if isinstance(module, classes[1]):
            return Quantization(load_in_kbits=8)
    return Quantization()


def prepare_for_kbit_training(model: Any) -> Any:
    """Make a quantized base ready for adapter training, the way peft does, minus reentrant checkpointing.

    ``peft.prepare_model_for_kbit_training`` freezes every base parameter and upcasts the non-quantized
    fp16/bf16 ones (norms, embeddings, LM head) to fp32, so that norms and the loss are computed in full
    precision while the adapters' gradients flow through the quantized linears. Its checkpointing part is
    not used (``use_gradient_checkpointing=False``): with ``--gradient_checkpointing`` the Trainer calls
    :meth:`mtlora.model.MtLoraModel.gradient_checkpointing_enable`, which is always non-reentrant, so the
    inputs need no ``requires_grad`` hook and the balance loss keeps its gradient.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# ----------------------------------------------------------------------------------------------- CLI
def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "t"):
        return True
    if value in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """The released quantization flags for the argparse commands (eval, analyze, export, lorahub).

    Same names, defaults and spelling as ``train.py`` (whose ``HfArgumentParser`` builds them from
    :class:`mtlora.training.arguments.ModelArguments`): ``--double_quant [BOOL]`` and ``--no_double_quant``.
    """
    group = parser.add_argument_group("quantized base (QLoRA; needs bitsandbytes)")
    group.add_argument(
        "--load_in_kbits",
        type=int,
        choices=KBITS,
        default=16,
        help="store the base model's linears in 4 bit (NF4/FP4), 8 bit (LLM.int8) or 16 (not quantized, default)",
    )
    group.add_argument(
        "--double_quant",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        help="4 bit: also quantize the quantization statistics (default True)",
    )
    group.add_argument("--no_double_quant", dest="double_quant", action="store_false", help=argparse.SUPPRESS)
    group.add_argument(
        "--quant_type", choices=QUANT_TYPES, default="nf4", help="4-bit data type (default nf4)"
    )


def from_args(args: Any) -> Quantization:
    """:class:`Quantization` from parsed flags (argparse namespace or ``ModelArguments``)."""
    return Quantization(
        load_in_kbits=int(args.load_in_kbits),
        double_quant=bool(args.double_quant),
        quant_type=str(args.quant_type),
    )
