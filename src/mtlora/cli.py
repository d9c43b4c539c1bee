"""`mtlora` command-line entry point.

One entry point, one sub-command per workflow (like litgpt). Each sub-command lives in its own module and
exposes ``main(argv: list[str]) -> int``; this file only dispatches, so ``mtlora --help`` stays fast
(torch/transformers are imported lazily by the sub-command that needs them).

Errors: a sub-command raises :class:`mtlora.errors.MtLoraError` (or ``ValueError``, an ``OSError`` such as
a missing file or a full disk) for bad input; we print one ``error: ...`` line and exit 2. A bare ``--debug``
(or ``MTLORA_DEBUG=1``) shows the full traceback instead; ``--debug VALUE`` is the Trainer's own option and is
passed to ``mtlora train`` untouched (:func:`mtlora.cli_args.take_debug`).

No command prints the usage to stderr and exits 2 (``-h`` exits 0). A closed stdout pipe
(``mtlora eval ... | head``) ends the command quietly with status 1 instead of a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, help). The module must define main(argv) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("mtlora.params", "count trainable/total parameters of a method on a model (meta device)"),
    "train": ("mtlora.training.cli", "fine-tune a model with lora / hydralora / mmoelora / mtlora"),
    "eval": ("mtlora.evaluation.cli", "evaluate on BBH or MMLU (paper or lm-eval-harness protocol)"),
    "data": ("mtlora.data.cli", "convert Dolly / Flan-v2 CoT / Natural Instructions / Flan data"),
    "convert": ("mtlora.convert", "convert checkpoints (llama2.c -> Hugging Face Llama)"),
    "demo": ("mtlora.demo", "train and compare lora / hydralora / mtlora on the bundled tiny model"),
    "analyze": (
        "mtlora.analysis.cli",
        "paper analysis figures: routing entropy/usage/FGR maps, SV spectra and conflict, task-gradient similarity",
    ),
    "export": (
        "mtlora.export",
        "export per task: plain peft LoRA / merged model (component) or block-adapter bundle (block)",
    ),
    "lorahub": (
        "mtlora.lorahub",
        "compose LoRAs for a target task from a few examples (LoRAHub, gradient-free)",
    ),
    "repro": (
        "mtlora.repro",
        "reproduce the paper's tables (train + evaluate + assemble; --dry-run, --smoke)",
    ),
}


def _usage() -> str:
    lines = ["usage: mtlora <command> [options]   (mtlora <command> --help for details)", "", "commands:"]
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``mtlora <command> ...``: dispatch, with the BrokenPipe recipe of the Python docs (signal docs, "Note on
    SIGPIPE"): on a closed stdout, point stdout at devnull so the interpreter's final flush stays quiet, and
    return 1. No SIGPIPE handler is installed, because tests call ``main`` in-process."""
    try:
        try:
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
        finally:  # also after --help's SystemExit: a closed pipe surfaces here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of stdout went away: silence stdout for the interpreter's final flush; exit status 1."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured by a test)
        pass
    return 1


def _dispatch(argv: list[str]) -> int:
    from mtlora.cli_args import take_debug

    debug = False
    while argv and argv[0] == "--debug":  # before the command name it can only be mtlora's switch
        argv, debug = argv[1:], True
    argv, bare_debug = take_debug(argv)
    debug = debug or bare_debug
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] == "--version":
        from mtlora import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(
                f"error: command {name!r} is not available in this build ({module_name} missing)",
                file=sys.stderr,
            )
            return 2
        raise
    return run_main(module.main, rest, debug=debug, prog=f"mtlora {name}")


def run_main(fn, argv: list[str], *, debug: bool = False, prog: str = "mtlora") -> int:
    """Run ``fn(argv)``; turn user errors into one clear line unless ``debug`` (or a bare ``--debug`` in
    ``argv``: ``train.py`` and ``eval_*.py`` come here directly)."""
    import pickle

    from mtlora.cli_args import take_debug
    from mtlora.errors import MtLoraError, refused_pickle_detail

    argv, bare_debug = take_debug(argv)
    debug = debug or bare_debug
    try:
        try:
            rc = fn(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:  # an OSError, but not a user error: `... | head` closed the pipe
        return _closed_pipe()
    except (MtLoraError, ValueError, OSError, KeyError) as exc:
        if debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if (
            isinstance(exc, OSError) and exc.filename and exc.strerror
        ):  # disk full, permissions, a file in the way
            msg = f"{exc.filename}: {exc.strerror}"
        # one line: messages from libraries (transformers, torch) often span several
        text = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
        print(f"error: {text}", file=sys.stderr)
        return 2
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused a file: say so in one line
        if debug:
            raise
        print(
            f"error: refused to load a pickled file that holds more than tensors and plain values "
            f"({refused_pickle_detail(exc)}); it was not executed",
            file=sys.stderr,
        )
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
