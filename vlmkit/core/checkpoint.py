"""Atomic writes, the one implementation vlmkit uses: a file (:func:`atomic_file`,
:func:`write_text_atomic`) or a folder (:func:`atomic_dir`: checkpoints, exports) is written under a
temporary name beside its target and renamed into place only when complete, so a crash leaves the
old or the new version, never half of one. Temporary names: ``.NAME.XXXX.tmp`` (files) and
``.NAME.tmp-XXXX`` (folders), which :mod:`vlmkit.core.engine.run_folder` knows as vlmkit's own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (``.NAME.XXXX.tmp``) for the caller to write; on
    success it is flushed to disk (fsync) and replaces ``target`` (``os.replace``), and the folder is
    fsync'ed so the rename itself is durable; on an error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = target.name if target.name.startswith(".") else f".{target.name}"
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{prefix}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_text_atomic(target: Path, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``target`` atomically (:func:`atomic_file`)."""
    with atomic_file(target) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
    return Path(target)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the replace itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(target: Path, *, owned: Collection[str] | None = None, last: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target``.

    ``owned`` (the names the writer puts in the folder) given: entries of an existing ``target``
    with other names are someone else's files and are kept. A target without such entries is
    replaced whole (one rename); otherwise each owned entry is replaced one by one, ``last`` (the
    file that marks the folder complete) removed first and put in place last. Without ``owned`` an
    existing ``target`` is replaced whole (it must hold only the writer's files)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            tmp.rename(target)
        elif owned is not None and any(p.name not in owned for p in target.iterdir()):
            _replace_entries(tmp, target, owned, last)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_entries(new: Path, target: Path, owned: Collection[str], last: str | None) -> None:
    """Move each owned entry of ``new`` into ``target`` over the old one; owned entries ``new``
    lacks are removed from ``target``; every other entry of ``target`` stays untouched."""
    order = [name for name in owned if name != last] + ([last] if last is not None else [])
    if last is not None:
        (target / last).unlink(missing_ok=True)  # the folder is incomplete until it is back
    for name in order:
        src, dst = new / name, target / name
        old = None
        if dst.exists() or dst.is_symlink():
            old = target / f".{name}.old-{os.getpid()}"
            dst.rename(old)
        if src.exists():
            src.rename(dst)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
