"""Atomic file and folder writes: the one place cmn writes outputs a crash must not half-write.

- :func:`write_atomic` / :func:`write_json`: a file is written to a hidden temporary sibling,
  flushed to disk and renamed over the target (``os.replace`` is atomic on one file system),
  so a reader sees the old file or the new one, never a part.
- :func:`folder_writer`: a whole folder is built in a hidden temporary sibling and renamed into
  place when complete; with ``replace=True`` the old folder is set aside first and removed
  last, so a crash leaves either folder (checkpoint bundles find a set-aside one themselves).
- :func:`remove_stale_temps`: leftovers of killed writers, recognised by their prefix.

Temporary names are ``.<name>.tmp-<random>`` beside the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from cmn.errors import CMNError

PathLike = Union[str, "os.PathLike[str]"]


def temp_prefix(target: Path) -> str:
    """The prefix of every temporary sibling cmn makes for ``target``."""
    return f".{target.name}.tmp-"


def fsync_path(p: Path) -> None:
    """Flush a file or folder to disk where the file system allows it."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders; the rename order still holds
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _io_error(target: Path, e: OSError) -> CMNError:
    return CMNError(f"{target}: cannot write ({e.strerror or e})")


def write_atomic(path: PathLike, data: Union[str, bytes], *, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically; an OSError (disk full, no permission) is a
    :class:`CMNError` naming the file, and the previous file, if any, is left as it was."""
    target = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), dir=target.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise _io_error(target, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


def write_json(path: PathLike, obj: Any, *, indent: int = 2) -> Path:
    """:func:`write_atomic` of ``obj`` as JSON (sorted keys, trailing newline)."""
    return write_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


@contextlib.contextmanager
def folder_writer(path: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``path``.

    Without ``replace`` an existing ``path`` is an error (callers check first and offer
    ``--force``); with it the old folder is moved to ``.<name>.previous``, the new one renamed
    into place and the old one deleted. On any error the temporary folder is removed and
    ``path`` is untouched.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    except OSError as e:
        raise _io_error(target, e) from None
    try:
        yield tmp
        _flush_tree(tmp)
        aside = target.with_name(f".{target.name}.previous")
        if target.exists():
            if not replace:
                raise CMNError(f"{target}: already exists")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
        os.replace(tmp, target)
        fsync_path(target.parent)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _io_error(target, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_FSYNC_EACH_UP_TO = 256  # files; above that one os.sync() (a prepared dataset holds thousands)


def _flush_tree(folder: Path) -> None:
    """Make a finished folder durable before it is renamed into place: fsync each file of a
    small folder (a checkpoint: a few files; os.sync would wait for every other process's
    writes too), one ``os.sync`` for a large one."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    if len(files) > _FSYNC_EACH_UP_TO and hasattr(os, "sync"):
        os.sync()
        return
    for f in files:
        fsync_path(f)


def remove_stale_temps(target: PathLike, *, older_than_s: float = 0.0) -> int:
    """Delete temporary siblings of ``target`` left by killed writers; returns how many.

    ``older_than_s`` spares younger ones (another process may still be writing them)."""
    target = Path(target)
    removed = 0
    if not target.parent.is_dir():
        return 0
    now = time.time()
    for p in target.parent.glob(temp_prefix(target) + "*"):
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
        except OSError:
            continue
    return removed


__all__ = ["folder_writer", "fsync_path", "remove_stale_temps", "temp_prefix", "write_atomic", "write_json"]
