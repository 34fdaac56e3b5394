"""Replace a directory as a whole: write the new one beside it, then put it in place in one step.

:func:`write_directory` is how :func:`se_inject.save` writes: a failure at any point (a full disk,
an exception, a crash) leaves what the directory held before whole, and removes what it wrote.

* No directory yet: the new one is renamed into place (one ``rename``).
* A directory holding an earlier write: the two are exchanged in one step with Linux's
  ``renameat2(RENAME_EXCHANGE)``, then the old one is removed. Where the system or the file
  system has no exchange, two renames (old aside, new in) with the first undone if the second
  fails; a crash between the two leaves the earlier write whole in a hidden sibling
  ``.<name>.se_inject-old-*``, the only moment it is not at its place.
* A directory holding other things only (a first save into an existing directory): the new
  files are moved in one by one, the last one last (the recipe: it is what makes the directory a
  save), and the ones moved are taken out again if a later one fails.

The new directory is made with the usual permissions (``os.mkdir``, not ``mkdtemp``'s 0700), and
an exchanged one takes those of the directory it replaces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["write_directory"]

_NEW, _OLD = ".se_inject-new-", ".se_inject-old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap(new: Path, out: Path) -> None:
    """Put the directory ``new`` in place of the directory ``out``, then remove what ``out`` held
    (a failure to remove it is not an error: the new directory is in place)."""
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)
        return
    old = new.with_name(new.name.replace(_NEW, _OLD))
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_in(new: Path, out: Path, files: Sequence[str]) -> None:
    moved = []
    try:
        for name in files:
            os.replace(new / name, out / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            (out / name).unlink(missing_ok=True)
        raise


def _new_sibling(out: Path) -> Path:
    """An empty directory beside ``out``, made with the usual permissions (umask)."""
    while True:
        new = out.with_name(f".{out.name[:200]}{_NEW}{secrets.token_hex(4)}")
        try:
            os.mkdir(new)
            return new
        except FileExistsError:
            continue


def write_directory(out: Path, write: Callable[[Path], None], files: Sequence[str]) -> None:
    """Make ``out`` hold what ``write(directory)`` writes, all of it or (on failure) none of it.

    ``write`` gets an empty directory beside ``out`` and writes ``files`` into it (the last one is
    the one whose presence says the write is complete). Then the directory takes the place of
    ``out`` (see the module docstring); when ``out`` is a directory holding none of ``files``, they
    are moved into it instead, and whatever else it holds stays. The caller decides beforehand
    whether ``out`` may be replaced: an exchange replaces everything in it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    new = _new_sibling(out)
    try:
        write(new)
        if not out.exists():
            os.rename(new, out)
        elif any((out / name).exists() for name in files):
            shutil.copymode(out, new)
            _swap(new, out)
        else:
            _move_in(new, out, files)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # what is left of it when anything failed
