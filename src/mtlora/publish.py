"""``--push_to_hub REPO``: upload a finished adapter or export folder to the Hugging Face Hub.

Why our own step instead of the Trainer's ``push_to_hub``: the Trainer pushes its whole output folder
(checkpoints, optimizer states) on every save; what users share is the final adapter folder with its model
card, and for exports the folder with every task, the report and the cards. The upload happens once, after
the folder is complete, through ``huggingface_hub`` (``create_repo(exist_ok=True)`` + ``upload_folder``).

Offline (``HF_HUB_OFFLINE=1``) the flag is refused before any work starts, in one line. A network or
permission failure at upload time is one line too, and names the local folder (nothing is lost: it is
complete on disk) and the command that uploads it later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mtlora.errors import ConfigError, MtLoraError

__all__ = ["check_push_target", "push_folder"]

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) at import time; read the environment too
    (it may be set after the import)."""
    if any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def check_push_target(repo: str, flag: str = "--push_to_hub") -> str:
    """Validate ``repo`` (``name`` or ``owner/name``) and that the Hub can be reached at all; return ``repo``.

    Called before training or exporting, so an impossible push fails in seconds, not after hours of work.
    """
    repo = repo.strip()
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo:
        raise ConfigError(f"{flag} {repo!r}: not a Hub repo id (owner/name, letters, digits, '-', '_', '.')")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag}: huggingface_hub is not installed (pip install huggingface_hub)") from None
    if _offline():
        raise ConfigError(
            f"{flag} {repo}: the Hugging Face Hub is switched off here (offline mode: HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1); unset it to push, or "
            "drop the flag and upload the folder later with `hf upload REPO FOLDER`"
        )
    return repo


def push_folder(
    folder: str | Path, repo: str, *, private: bool | None = None, message: str | None = None
) -> str:
    """Create ``repo`` (a model repo; kept if it exists) and upload ``folder`` into it; returns the repo URL.

    Any failure (network, authentication, permissions) is one :class:`MtLoraError` line that says the folder
    is complete on disk and how to upload it later.
    """
    folder = Path(folder)
    check_push_target(repo)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            repo_type="model",
            commit_message=message or f"mtlora: upload {folder.name}",
        )
    except Exception as exc:  # the network boundary: HTTP, connection, auth, offline errors all end here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MtLoraError(
            f"--push_to_hub {repo}: upload failed ({type(exc).__name__}: {first}); {folder} is complete on disk - "
            f"upload it later with `hf upload {repo} {folder}`"
        ) from None
    return str(url)
