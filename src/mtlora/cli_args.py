"""One command-line convention for every ``mtlora`` sub-command.

Why a module of its own: each sub-command used to name the same concept differently (``--lora_checkpoint``,
positional ``adapter_dir``, ``--adapter``; ``--num_threads`` vs ``--threads``; progress bars that could not be
turned off), and several flags had no help text. Every ``build_parser`` now builds a :class:`Parser` and adds
the shared concepts through the ``add_*`` helpers below, so that

* the same concept has the same flag name everywhere (paper spellings stay as aliases, so the released
  scripts keep running): ``--model_name_or_path`` (alias ``--model``), ``--adapter``, ``--data``,
  ``--output_dir``, ``--device``, ``--dtype``, ``--threads``, ``--no_progress``, ``--trust_remote_code``;
* ``--a_b`` and ``--a-b`` are both accepted for every long option (as ``HfArgumentParser`` does for train);
* ``--help`` shows every flag's default (``tests/test_cli_convention.py`` also checks that each has help).

Kept free of torch/transformers imports: ``mtlora --help`` and ``mtlora data`` must start instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from mtlora.errors import MtLoraError

_NO_DEFAULT_NOTE = (None, False, argparse.SUPPRESS)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the text already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text.lower():
            return text
        if (
            action.required
            or action.default is argparse.SUPPRESS
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the mtlora convention: both spellings of every long option and
    defaults in ``--help``.

    Both spellings are accepted by rewriting an unknown ``--a-b`` (or ``--a_b``) to the registered spelling
    before parsing, rather than registering each option twice, so ``--help`` lists each flag once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def normalize(self, argv: Sequence[str]) -> list[str]:
        """``argv`` with each long option spelled as registered (``--max-steps`` -> ``--max_steps``)."""
        out: list[str] = []
        known = self._all_option_strings()
        for i, token in enumerate(argv):
            if token == "--":  # everything after is positional
                return out + list(argv[i:])
            if token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                if name not in known:
                    body = name[2:]
                    for alt in ("--" + body.replace("-", "_"), "--" + body.replace("_", "-")):
                        if alt in known:
                            token = alt + eq + value
                            break
            out.append(token)
        return out

    def _all_option_strings(self) -> set[str]:
        """This parser's option strings and those of its sub-commands (so the rewrite does not depend on how
        argparse hands the rest of the command line to a sub-parser)."""
        known = set(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    known |= (
                        sub._all_option_strings()
                        if isinstance(sub, Parser)
                        else set(sub._option_string_actions)
                    )
        return known

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.normalize(argv), namespace)


# ------------------------------------------------------------------------------------------ shared concepts
def add_model(
    p: argparse.ArgumentParser | Any, *, required: bool = False, default: str | None = None, help: str = ""
) -> None:
    """``--model_name_or_path`` (alias ``--model``): the base model."""
    p.add_argument(
        "--model_name_or_path",
        "--model",
        dest="model_name_or_path",
        metavar="MODEL",
        required=required,
        default=default,
        help=help or "base model: mtlora:<name> (bundled), a folder or a hub id",
    )


def add_adapter(
    p: argparse.ArgumentParser | Any,
    *,
    required: bool = False,
    aliases: Sequence[str] = (),
    dest: str = "adapter",
    help: str = "",
) -> None:
    """``--adapter`` (plus the command's paper alias, e.g. eval's ``--lora_checkpoint``): an adapter folder."""
    p.add_argument(
        "--adapter",
        *aliases,
        dest=dest,
        metavar="DIR",
        required=required,
        default=None,
        help=help or "adapter folder (output_dir/sft_lora_model of mtlora train)",
    )


def add_data(
    p: argparse.ArgumentParser | Any,
    *,
    required: bool = False,
    aliases: Sequence[str] = (),
    dest: str = "data",
    help: str,
) -> None:
    """``--data`` (plus the command's own names, e.g. export's ``--calibration_data``): the input records."""
    p.add_argument("--data", *aliases, dest=dest, metavar="PATH", required=required, default=None, help=help)


def add_output(
    p: argparse.ArgumentParser | Any, *, required: bool = True, default: str | None = None, help: str
) -> None:
    """``--output_dir``: where the command writes (checked before any work by mtlora.outputs)."""
    p.add_argument("--output_dir", metavar="DIR", required=required, default=default, help=help)


def add_runtime(
    p: argparse.ArgumentParser | Any,
    *,
    device: bool = True,
    device_choices: Sequence[str] | None = None,
    device_default: str | None = None,
    dtype: bool = True,
    dtype_default: str | None = None,
    dtype_choices: Sequence[str] | None = None,
    threads: bool = True,
    threads_default: int | None = None,
    threads_aliases: Sequence[str] = (),
    threads_dest: str = "threads",
    threads_help: str = "",
    progress: bool = True,
) -> None:
    """``--device``, ``--dtype``, ``--threads``, ``--no_progress`` (defaults stay each command's own)."""
    if device:
        text = "cpu | cuda[:i]" + (
            "; auto = cuda if available" if device_choices and "auto" in device_choices else ""
        )
        p.add_argument(
            "--device",
            default=device_default,
            choices=device_choices,
            help=text + ("" if device_default else " (default: cuda if available, else cpu)"),
        )
    if dtype:
        p.add_argument(
            "--dtype",
            default=dtype_default,
            choices=dtype_choices,
            help="base model dtype"
            + ("" if dtype_default else " (default: float32 on cpu, bfloat16 on cuda)"),
        )
    if threads:
        p.add_argument(
            "--threads",
            *threads_aliases,
            dest=threads_dest,
            type=int,
            metavar="N",
            default=threads_default,
            help=threads_help or "torch CPU threads (default: torch's choice)",
        )
    if progress:
        p.add_argument("--no_progress", action="store_true", help="no progress bars")


#: The process-wide progress switch (like transformers' ``disable_progress_bar``): ``--no_progress`` turns it
#: off; bars that mtlora creates pass ``disable=not progress_enabled()``.
_PROGRESS = {"enabled": True}


def apply_runtime(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and ``--no_progress`` before the command's work starts.

    * ``OMP_WAIT_POLICY=PASSIVE`` (before torch is imported; a user's setting wins): OpenMP threads that spin
      while waiting make a shared CPU crawl (22 s instead of 1.8 s measured for one eval run on a loaded
      2-core machine); sleeping waiters cost almost nothing on an idle one.
    * ``--threads N``: ``torch.set_num_threads(N)``, and ``OMP_NUM_THREADS`` for child processes (repro).
    * ``--no_progress``: :func:`progress_enabled` turns False for this process, and ``TQDM_DISABLE=1`` turns
      off every tqdm bar of child processes (tqdm reads it when it is imported, so in this process it only
      helps if tqdm was not imported yet).
    """
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise MtLoraError(f"--threads must be > 0, got {threads}")
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    if getattr(args, "no_progress", False):
        _PROGRESS["enabled"] = False
        os.environ["TQDM_DISABLE"] = "1"


def progress_enabled(args: argparse.Namespace | None = None) -> bool:
    """Whether progress bars should show: not after ``--no_progress`` (in ``args`` or applied earlier)."""
    return _PROGRESS["enabled"] and not getattr(args, "no_progress", False)


def set_progress(enabled: bool) -> None:
    """Turn mtlora's progress bars on or off for this process (what ``--no_progress`` does)."""
    _PROGRESS["enabled"] = enabled


# ------------------------------------------------------------------------------------------------ --debug
def take_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Split mtlora's traceback switch off ``argv``: ``(argv without it, debug)``.

    A bare ``--debug`` (the last argument, or followed by another ``-`` option) is mtlora's switch: user errors
    then show the full traceback. ``--debug VALUE`` is the Trainer's own option (``--debug
    underflow_overflow``) and passes through untouched. ``MTLORA_DEBUG=1`` also turns tracebacks on.
    """
    out: list[str] = []
    debug = os.environ.get("MTLORA_DEBUG", "").lower() in ("1", "true", "yes")
    args = list(argv)
    for i, token in enumerate(args):
        if token == "--":
            return out + args[i:], debug
        if token == "--debug" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            debug = True
            continue
        out.append(token)
    return out, debug
