"""Two processes sharing one compile cache: one builds an entry, the other waits and uses it.

The builds here are fake (a sleep and a file write), so the races are real processes racing on
the real lock without a TVM compile; parity/compiled/build.py takes the same lock around its build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parity.cache_lock import build_once, entry_lock, lock_path_for, publish_dir, publish_file
from parity.errors import ParityError

REPO = Path(__file__).resolve().parents[1]

# A process that builds ENTRY once (a directory holding the builder's pid) unless it is ready,
# and records in BUILDS each build it made. The build sleeps so that the racers overlap.
RACER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from parity.cache_lock import build_once, publish_dir

    entry, builds, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():  # start together
        time.sleep(0.005)

    def ready():
        f = entry / "library.so"
        return f.read_text() if f.is_file() else None

    def build():
        with builds.open("a") as log:
            log.write(f"{os.getpid()}\\n")
        with publish_dir(entry) as tmp:
            (tmp / "library.so").write_text(f"built by {os.getpid()}")
            time.sleep(0.5)  # a compile: long enough that the other racer arrives while it runs
            (tmp / "sidecar.json").write_text("{}")
        return ready()

    print(build_once(entry, ready=ready, build=build, on_wait=lambda m: print("WAIT", m, file=sys.stderr)))
    """
)


def _start(args: list, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_processes_racing_for_one_entry_build_it_once(tmp_path):
    entry, builds, go = tmp_path / "cache" / "rwkv5-plain-llvm-abc", tmp_path / "builds.log", tmp_path / "go"
    racers = [_start([RACER, entry, builds, go]) for _ in range(3)]
    time.sleep(0.3)  # let all three import and spin on `go`
    go.touch()
    outs = [p.communicate(timeout=60) for p in racers]
    assert [p.returncode for p in racers] == [0, 0, 0], outs
    built_by = builds.read_text().split()
    assert len(built_by) == 1, built_by  # one compile, not three
    # Every racer got the one published entry, whole: the builder's library beside its sidecar.
    assert {out.strip() for out, _ in outs} == {f"built by {built_by[0]}"}
    assert sorted(p.name for p in entry.iterdir()) == ["library.so", "sidecar.json"]
    waited = [err for _, err in outs if "WAIT" in err]
    assert waited and all(f"process {built_by[0]}" in err for err in waited), outs
    # Nothing half-written is left beside the entry; the lock file stays (see parity/cache_lock.py).
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, lock_path_for(entry).name]


def test_a_killed_builder_releases_the_lock_and_leaves_no_entry(tmp_path):
    entry = tmp_path / "entry"
    holder = _start([textwrap.dedent("""
        import sys, time
        from parity.cache_lock import entry_lock, publish_dir
        with entry_lock(sys.argv[1]), publish_dir(sys.argv[1]) as tmp:
            (tmp / "library.so").write_text("half")
            print("building", flush=True)
            time.sleep(60)
        """), entry])
    try:
        assert holder.stdout.readline().strip() == "building"
        with pytest.raises(ParityError, match=r"gave up after 0.2 s waiting for process \d+ to finish building entry"):
            with entry_lock(entry, timeout_s=0.2):
                pass
        holder.send_signal(signal.SIGKILL)  # mid-build: no finally block runs in the holder
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    t0 = time.monotonic()
    with entry_lock(entry, timeout_s=5):  # the kernel dropped the dead holder's lock
        waited = time.monotonic() - t0
    assert waited < 1, waited
    assert not entry.exists()  # the killed build's temporary directory never became the entry


def test_waiting_is_announced_once_and_the_lock_is_exclusive(tmp_path):
    entry = tmp_path / "e"
    messages = []
    with entry_lock(entry):
        with pytest.raises(ParityError, match="gave up"):
            with entry_lock(entry, timeout_s=0.1, on_wait=messages.append):
                pass
    assert messages == [f"waiting for process {os.getpid()} to finish building e"]
    with entry_lock(entry, timeout_s=0.1, on_wait=messages.append):  # free again after the block
        pass
    assert len(messages) == 1


def test_build_once_skips_the_build_when_the_entry_is_ready(tmp_path):
    calls = []
    assert build_once(tmp_path / "e", ready=lambda: "cached", build=lambda: calls.append(1)) == "cached"
    assert calls == [] and not lock_path_for(tmp_path / "e").exists()  # a hit takes no lock
    assert build_once(tmp_path / "e", ready=lambda: None, build=lambda: "built") == "built"


def test_publish_dir_replaces_an_entry_whole_or_not_at_all(tmp_path):
    entry = tmp_path / "entry"
    with publish_dir(entry) as tmp:
        assert not entry.exists()  # nothing at the final path while the entry is written
        (tmp / "a").write_text("1")
    assert (entry / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with publish_dir(entry) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("build failed")
    assert (entry / "a").read_text() == "1"  # the failed build left the old entry as it was
    with publish_dir(entry) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in entry.iterdir()) == ["b"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporary or old directory left


def test_publish_file_is_a_rename(tmp_path):
    final = tmp_path / "x.so"
    final.write_text("old")
    with pytest.raises(OSError):
        with publish_file(final) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert final.read_text() == "old"
    with publish_file(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.so"]


def test_an_unwritable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # --cache-dir naming a file: one line, not FileExistsError/NotADirectoryError from mkdir.
    with pytest.raises(ParityError, match="cannot lock compile cache entry e in .*must be a writable directory"):
        with entry_lock(blocker / "e"):
            pass
