"""What an exported task can be deployed as, which base model it names, and the command that loads it.

Why a module of its own: ``mtlora export`` (report.json and its printout), the model cards and the README all
state the same three facts per artefact - its form, its base, its load command - and they must agree. The
forms follow from where the adapter sits:

* component level (LoRA on ``nn.Linear`` modules): a frozen routing collapses the experts into one LoRA, so a
  task becomes a **plain peft LoRA** (peft, lm-eval ``peft=``, vLLM/LoRAX multi-LoRA serving) and, with
  ``--merged``, a **merged model** (base weights + the static update; any transformers-compatible stack);
* block level: the parallel path over a whole block bypasses the block's non-linearity, so no LoRA on an
  existing weight expresses it; a task becomes a **block-adapter bundle** (:mod:`mtlora.bundle`): weights,
  config, tokenizer and a loader that needs only torch/safetensors/transformers.

The base an export names must be loadable by plain transformers: a hub id stays as it is, a local folder is
recorded as its absolute path, and a bundled ``mtlora:<name>`` model (which only mtlora can resolve) is copied
into the export as ``<output_dir>/base_model/`` - a few MB at most - and that folder is recorded.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from mtlora.atomic import atomic_dir
from mtlora.hub import PREFIX, resolve_model_path

__all__ = [
    "BASE_COPY_DIR",
    "FORM_BUNDLE",
    "FORM_MERGED",
    "FORM_PEFT",
    "FORM_TITLES",
    "PLACEMENT_FORMS",
    "artifact",
    "export_base",
    "load_code",
    "load_command",
    "load_snippet",
]

FORM_PEFT = "peft_lora"
FORM_MERGED = "merged_model"
FORM_BUNDLE = "block_adapter_bundle"
FORM_TITLES = {
    FORM_PEFT: "plain peft LoRA",
    FORM_MERGED: "merged model (base + static update)",
    FORM_BUNDLE: "block-adapter bundle (weights + standalone loader)",
}
#: adapter placement -> the forms ``mtlora export`` can produce for it (merged only with ``--merged``)
PLACEMENT_FORMS = {"component": (FORM_PEFT, FORM_MERGED), "block": (FORM_BUNDLE,)}
#: where a bundled base model is copied inside an export folder
BASE_COPY_DIR = "base_model"
DEMO_PROMPT = "Once upon a time"
DEMO_TOKENS = 16


def export_base(name: str, out_dir: str | Path) -> tuple[str, str | None]:
    """``(base recorded in the exports, copy folder relative to out_dir or None)`` for base model ``name``.

    A bundled ``mtlora:<name>`` model is copied to ``out_dir/base_model`` (written as a unit) because plain
    transformers cannot resolve the prefix and the package folder is an install detail; a local folder is made
    absolute (the export may be loaded from another working directory); anything else is a hub id.
    """
    if name.lower().startswith(PREFIX):
        source = Path(resolve_model_path(name))
        dest = Path(out_dir) / BASE_COPY_DIR
        with atomic_dir(dest) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        return str(dest.resolve()), BASE_COPY_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), None
    return name, None


def load_code(form: str, path: str | Path) -> str:
    """One line of Python that loads the artefact at ``path`` (absolute) and prints a short greedy generation."""
    p = json.dumps(str(path))  # double quotes: the shell command wraps the code in single quotes
    gen = (
        f'ids = tok({json.dumps(DEMO_PROMPT)}, return_tensors="pt"); '
        f"print(tok.decode(model.generate(**ids, max_new_tokens={DEMO_TOKENS}, do_sample=False)[0]))"
    )
    if form == FORM_PEFT:
        return (
            "from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer; "
            f"model = AutoPeftModelForCausalLM.from_pretrained({p}); tok = AutoTokenizer.from_pretrained({p}); "
            + gen
        )
    if form == FORM_MERGED:
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"model = AutoModelForCausalLM.from_pretrained({p}); tok = AutoTokenizer.from_pretrained({p}); "
            + gen
        )
    if form == FORM_BUNDLE:
        return (
            f"import sys; sys.path.insert(0, {p}); from load_block_export import load_bundle; "
            f"model, tok = load_bundle({p}); " + gen
        )
    raise ValueError(f"unknown export form {form!r}")


def load_command(form: str, path: str | Path) -> str:
    """The shell command that loads the artefact and generates a few tokens (what ``mtlora export`` prints)."""
    if form == FORM_BUNDLE:
        folder = str(path)
        return (
            f"python {shlex.quote(str(Path(folder) / 'load_block_export.py'))} {shlex.quote(folder)} "
            f"--prompt {shlex.quote(DEMO_PROMPT)} --max_new_tokens {DEMO_TOKENS}"
        )
    return f"python -c {shlex.quote(load_code(form, path))}"


def load_snippet(form: str, path: str, base: str | None = None) -> str:
    """A readable multi-line Python snippet for model cards (``path`` as the reader should write it)."""
    p = repr(path)
    if form == FORM_PEFT:
        lines = [
            "from peft import AutoPeftModelForCausalLM, PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoPeftModelForCausalLM.from_pretrained({p})  # base from adapter_config.json",
            f"# or: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {p})",
            f"tok = AutoTokenizer.from_pretrained({p})",
        ]
    elif form == FORM_MERGED:
        lines = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({p})",
            f"tok = AutoTokenizer.from_pretrained({p})",
        ]
    elif form == FORM_BUNDLE:
        lines = [
            f"import sys; sys.path.insert(0, {p})  # the bundle's own loader; mtlora is not needed",
            "from load_block_export import load_bundle, load_block_export",
            "",
            f"model, tok = load_bundle({p})  # base from block_adapter_config.json, adapter attached",
            f"# or: handles = load_block_export(AutoModelForCausalLM.from_pretrained({base!r}), {p})",
        ]
    else:
        raise ValueError(f"unknown export form {form!r}")
    lines += [
        "",
        f"ids = tok({DEMO_PROMPT!r}, return_tensors='pt')",
        f"print(tok.decode(model.generate(**ids, max_new_tokens={DEMO_TOKENS}, do_sample=False)[0]))",
    ]
    return "\n".join(lines)


def artifact(form: str, rel_path: str, out_dir: str | Path) -> dict[str, Any]:
    """The report.json record of one artefact: form, folder (relative to the export) and its load command."""
    absolute = Path(out_dir).resolve() / rel_path
    return {"form": form, "path": rel_path, "load_command": load_command(form, absolute)}
