"""One builder per compile cache entry, and entries that appear whole or not at all.

Two ``parity run``s sharing one cache (two CI jobs, a sweep under ``pytest -n``) both miss an
entry that is not built yet. Without a lock both compile it (minutes each), and their writes
interleave: one process's sidecar can end up beside the other's library, or one renames away the
temporary file the other is about to rename. With ``entry_lock`` the second process waits, then
finds the entry the first one published and uses it.

The lock is ``fcntl.flock`` on ``<entry>.lock``: the kernel drops it when its holder exits, however
it exits (SIGKILL, a segfault in a compile), so a killed build never leaves a stale lock to
delete. Lock files are never removed: a process that unlinks one while another waits on it would
let a third lock a new file of the same name, and two builders would run at once. (POSIX only, as
the rest of the tool; on NFS, Linux maps flock onto byte-range locks, which NFSv4 supports.)

Publishing is a rename: ``publish_dir``/``publish_file`` hand out a temporary sibling of the final
path and rename it into place only when the block exits cleanly, so a reader sees the old entry,
no entry, or the whole new one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from parity.errors import ParityError

T = TypeVar("T")
LOCK_SUFFIX = ".lock"
_POLL_S = 0.05  # how often a waiter with a timeout retries; a compile takes minutes, so this is cheap


def lock_path_for(entry: str | os.PathLike[str]) -> Path:
    entry = Path(entry)
    return entry.with_name(entry.name + LOCK_SUFFIX)


@contextmanager
def entry_lock(
    entry: str | os.PathLike[str],
    *,
    on_wait: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> Iterator[Path]:
    """Hold the exclusive lock of cache entry ``entry`` (a file or directory path, existing or not).

    Blocks while another process holds it, after calling ``on_wait`` once with a line that says
    who holds it; ``timeout_s`` bounds the wait (ParityError after it). Yields the lock file's path.
    """
    lock = lock_path_for(entry)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        # e.g. --cache-dir naming a file (EEXIST, ENOTDIR), a read-only or full disk
        raise ParityError(f"cannot lock compile cache entry {Path(entry).name} in {lock.parent}: "
                          f"{e.strerror or e}; the compile cache must be a writable directory") from None
    try:
        if not _try_lock(fd):
            if on_wait is not None:
                on_wait(f"waiting for {_holder(lock)} to finish building {Path(entry).name}")
            if timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout_s
                while not _try_lock(fd):
                    if time.monotonic() >= deadline:
                        raise ParityError(
                            f"gave up after {timeout_s:g} s waiting for {_holder(lock)} to finish building "
                            f"{Path(entry).name} (lock {lock})"
                        )
                    time.sleep(_POLL_S)
        # Who holds it, for the next waiter's message; the lock itself is the flock, not this text.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def build_once(
    entry: str | os.PathLike[str],
    *,
    ready: Callable[[], T | None],
    build: Callable[[], T],
    on_wait: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> T:
    """``ready()`` if the entry is usable, else ``build()`` it with the entry's lock held.

    ``ready`` is asked again once the lock is held: the process we waited for has usually just
    published the entry, and building it a second time would waste the minutes the lock saved.
    """
    found = ready()
    if found is not None:
        return found
    with entry_lock(entry, on_wait=on_wait, timeout_s=timeout_s):
        found = ready()
        return found if found is not None else build()


@contextmanager
def publish_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; a clean exit renames it to ``final``.

    An existing ``final`` is replaced (moved aside, then removed): call this with the entry's lock
    held, so no other writer replaces it at the same time. On an exception the temporary directory
    is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        if final.exists():
            # Directories cannot be swapped in one rename(2); at every instant ``final`` is the old
            # entry, absent, or the new one, never a mix.
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.rename(final, old / "entry")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def publish_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; a clean exit renames it over ``final`` (atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"
