"""Output folders and the two safety flags every command shares: ``--overwrite_output_dir``, ``--trust_remote_code``.

Why: results must never be lost or replaced without a word. A command that would write over the results of
an earlier run in the same ``--output_dir`` refuses (one ``error:`` line naming the files) unless
``--overwrite_output_dir`` -- the Trainer's flag, with the same meaning -- is given. And a model folder that
ships its own Python code runs it only with ``--trust_remote_code``; the flag is always passed to
transformers explicitly, because left unset transformers asks ``[y/N]`` on stdin, which hangs a batch job.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

from mtlora.errors import MtLoraError

__all__ = ["add_safety_flags", "check_output_dir", "str2bool"]


def str2bool(text: str) -> bool:
    """``True``/``False`` the way ``HfArgumentParser`` reads them (yes/no, 1/0, true/false; any case)."""
    value = str(text).strip().lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def add_safety_flags(parser: argparse.ArgumentParser, *, overwrite: bool = True, trust: bool = True) -> None:
    """Add ``--overwrite_output_dir`` and/or ``--trust_remote_code`` (both default False; bare flag = True,
    ``--flag False`` also accepted, as on the training command line)."""
    if overwrite:
        parser.add_argument(
            "--overwrite_output_dir",
            nargs="?",
            const=True,
            default=False,
            type=str2bool,
            help="replace the results of an earlier run in --output_dir (default: refuse and say which files)",
        )
    if trust:
        parser.add_argument(
            "--trust_remote_code",
            nargs="?",
            const=True,
            default=False,
            type=str2bool,
            help="allow Python code shipped with the model folder to run (default: refuse; never asked on stdin)",
        )


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_dir(
    output_dir: str | os.PathLike[str],
    produces: Iterable[str] = (),
    *,
    overwrite: bool = False,
    refuse_nonempty: bool = False,
    flag: str = "--output_dir",
) -> Path:
    """Check, before any work starts, that ``output_dir`` can take this command's results.

    * a path that exists but is not a folder, or a folder that cannot be created or written: error;
    * ``produces`` (file or folder names inside ``output_dir``) already present: error naming them, unless
      ``overwrite``;
    * ``refuse_nonempty``: any content at all is an earlier run's (for outputs whose names depend on the data).
    """
    out = Path(output_dir)
    if not str(output_dir).strip():
        raise MtLoraError(f"{flag} is empty")
    if out.exists() and not out.is_dir():
        raise MtLoraError(f"{flag} {out}: exists and is not a folder")
    anchor = _nearest_existing(out)
    if not anchor.is_dir():
        raise MtLoraError(f"{flag} {out}: {anchor} is a file, so the folder cannot be created")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise MtLoraError(f"{flag} {out}: {anchor} is not writable")
    if overwrite or not out.is_dir():
        return out
    found = [name for name in produces if os.path.lexists(out / name)]
    if refuse_nonempty and not found:
        found = sorted(p.name for p in out.iterdir())[:5]
    if found:
        raise MtLoraError(
            f"{flag} {out} already holds {', '.join(found)} from an earlier run; pass --overwrite_output_dir "
            "to replace it, or choose another folder"
        )
    return out
