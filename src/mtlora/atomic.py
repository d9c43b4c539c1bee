"""Crash-safe writes: a file or a whole folder appears complete or not at all, with ordinary permissions.

Why: a run killed while saving (OOM killer, pre-emption, Ctrl-C, a full disk) must never leave a result
that loads but is wrong, e.g. the new adapter weights beside the old ``adapter_config.json``. Everything
mtlora writes therefore goes through one of three helpers:

* :func:`atomic_file` / :func:`write_text_atomic` -- one file: written to a temporary sibling, flushed to
  disk, then ``os.replace``-d over the target (POSIX guarantees readers see the old or the new file);
* :func:`atomic_dir` -- a folder written as a unit (adapter + config + tokenizer + task map, an export): the
  content is built in a temporary sibling folder and swapped in only when complete. On Linux the swap is one
  ``renameat2(RENAME_EXCHANGE)`` call, so the target path always names a complete folder. Where the file
  system cannot exchange, the old folder is first renamed to ``.<name>.old`` and the new one renamed into
  place; a kill between those two renames leaves no ``<name>`` but a complete ``.<name>.old``, which
  :func:`recover_interrupted` (used by every adapter loader) finds and loads instead.

Permissions: :func:`tempfile.mkstemp` creates files with mode 0600 and :func:`tempfile.mkdtemp` folders with
0700 whatever the umask, and so does ``safetensors.save_file`` (0600), so results written through them were
unreadable by colleagues on a shared disk (issue 12, item 8). Everything published here gets the permissions
of a plain ``open``/``mkdir`` under the process umask instead -- 0644 files and 0755 folders under the usual
umask 022 (executable bits a writer set are kept) -- and ``os.replace`` keeps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "atomic_dir",
    "atomic_file",
    "current_umask",
    "recover_interrupted",
    "write_bytes_atomic",
    "write_text_atomic",
]

logger = logging.getLogger("mtlora")

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (briefly process-wide)
    os.umask(mask)
    return mask


def _plain_mode(path: Path, mask: int) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (keeping executable bits of files)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        mode = 0o777 & ~mask
    else:
        mode = (0o666 | (st.st_mode & 0o111)) & ~mask
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` (same file system, so renames are atomic)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _old_name(path: Path) -> Path:
    """Where the fallback swap parks the previous folder for the instant between its two renames."""
    return path.with_name(f".{path.name}.old")


def _fsync_dir(path: Path) -> None:
    """Persist a rename or a new entry in ``path`` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_file(path: Path) -> Path:
    """Create an empty ``tag``ged sibling of ``path`` with mode 0666 & ~umask (never 0600 like mkstemp)."""
    for _ in range(100):
        tmp = _sibling(path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path`` atomically.

    The temporary file already exists (empty, umask permissions); writers that open it with ``"w"``/``"wb"``
    keep its mode. On any exception (or ``KeyboardInterrupt``) the temporary file is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_file(path)
    try:
        yield tmp
        _plain_mode(tmp, current_umask())  # a writer may have re-created it (safetensors: 0600)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (old or new content, never a truncated file); returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Binary variant of :func:`write_text_atomic`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _finish_tree(root: Path) -> None:
    """Plain permissions for everything under ``root`` (see the module docstring), then flush it to disk."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        _plain_mode(Path(dirpath), mask)
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                _plain_mode(p, mask)
                _fsync_file(p)
        _fsync_dir(Path(dirpath))


_renameat2: Callable[..., int] | None | bool = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if os.name == "posix":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (OSError, AttributeError):
                _renameat2 = False
    if _renameat2 is False:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)  # type: ignore[operator]
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this file system (or kernel) cannot exchange: use the two-rename fallback
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _swap_into_place(staging: Path, final: Path, *, exchange: bool = True) -> None:
    """Make ``staging`` the content of ``final`` (see the module docstring for the kill-safety argument)."""
    old = _old_name(final)
    if not os.path.lexists(final):
        # nothing to replace (or an earlier swap was interrupted after parking the old folder: that
        # ``.old`` copy is what loaders see until the rename below publishes the new folder)
        os.rename(staging, final)
        _fsync_dir(final.parent)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        return
    if not final.is_dir() or final.is_symlink():
        raise FileExistsError(f"{final} exists and is not a folder")
    if exchange and _exchange(staging, final):
        _fsync_dir(final.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous content
        return
    if os.path.lexists(old):
        shutil.rmtree(old, ignore_errors=True)  # stale: left after a completed swap, before its clean-up
    os.rename(final, old)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str], *, keep_existing: bool = False, exchange: bool = True
) -> Iterator[Path]:
    """Yield a temporary folder to build ``path``'s new content in; on success it replaces ``path`` as a unit.

    * ``keep_existing``: start from a copy of the current folder, so files the writer does not produce (a
      tokenizer saved earlier beside the adapter, a Trainer's optimizer state) are kept -- this is what
      ``save_pretrained`` into an existing folder means for peft and transformers. Without it the new folder
      holds exactly what the writer wrote.
    * ``exchange``: use the atomic Linux exchange when available (False forces the two-rename fallback; the
      tests use it to check the recovery path).

    A kill at any point leaves either the complete old folder or the complete new one at ``path`` (or, in
    the fallback's instant between two renames, the old one at ``.<name>.old``, see
    :func:`recover_interrupted`); temporary ``.<name>.tmp-*`` siblings of a killed run can be deleted.
    On an exception the temporary folder is removed and ``path`` is untouched.
    """
    final = Path(path)
    if final.is_symlink() and final.is_dir():
        final = final.resolve()  # a link to a folder elsewhere: replace that folder, keep the link
    final.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(final) and (not final.is_dir() or final.is_symlink()):
        raise FileExistsError(f"{final} exists and is not a folder")
    staging = _sibling(final, "tmp")
    os.mkdir(staging, 0o777)  # umask applies (mkdtemp would make it 0700)
    try:
        source = final if final.is_dir() else _old_name(final)
        if keep_existing and source.is_dir():
            shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
        yield staging
        _finish_tree(staging)
        _swap_into_place(staging, final, exchange=exchange)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_interrupted(path: str | os.PathLike[str]) -> Path:
    """``path``, or its complete previous version when a save was killed between the fallback's two renames.

    Loaders call this before reading an adapter folder, so the instant in which ``path`` does not exist (old
    folder parked at ``.<name>.old``, new one not yet renamed) still reads as "the old adapter".
    """
    path = Path(path)
    if not os.path.lexists(path):
        old = _old_name(path)
        if old.is_dir():
            logger.warning("%s: missing after an interrupted save; using the previous version %s", path, old)
            return old
    return path
