"""What a process knows before it loads TVM (parity/compiled/host.py): this machine's CPU name, as
LLVM gave it, remembered in the compile cache so a worker with TVM's runtime-only library can find
its cached build; and a runtime-only process that misses the cache compiles in a child (build.py)."""

from __future__ import annotations

import pytest

from parity.compiled import build, host
from parity.compiled.build import build_model
from parity.errors import ParityError
from parity.synthetic import make_config

TINY = make_config(n_layer=1, n_embd=32, head_size=16, vocab_size=64)  # compiles in about a second


def test_a_remembered_name_reads_back_for_this_machine_only(tmp_path, monkeypatch):
    assert host.remembered(tmp_path) is None
    host.remember(tmp_path, "znver5")
    assert host.remembered(tmp_path) == "znver5"
    # Another CPU (or another TVM release) has another fingerprint: its name is not this one's.
    monkeypatch.setattr(host, "_fingerprint", lambda: "another-machine")
    assert host.remembered(tmp_path) is None


def test_a_damaged_memo_is_no_name_and_an_unwritable_cache_is_no_error(tmp_path):
    path = host.memo_path(tmp_path)
    path.write_text("rm -rf /\n")  # not a CPU name LLVM would give: ignored, never put in a key
    assert host.remembered(tmp_path) is None
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    host.remember(blocked / "cache", "znver5")  # its parent is a file: nothing written, nothing raised
    assert host.remembered(blocked / "cache") is None


def test_asking_llvm_remembers_the_answer_in_the_cache(tmp_path, monkeypatch):
    from tvm.target import codegen

    monkeypatch.setenv("PARITY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PARITY_LLVM_CPU", raising=False)
    assert build.llvm_cpu() == str(codegen.llvm_get_system_cpu())
    assert host.remembered(tmp_path) == str(codegen.llvm_get_system_cpu())


def test_a_process_that_cannot_compile_has_a_child_compile_the_entry(tmp_path, monkeypatch):
    # What a runtime-only worker does on a cache miss: the entry is compiled and published by a
    # child with the full TVM; this process never compiles (tvm.compile here would raise).
    monkeypatch.setenv(host.COMPILE_IN_CHILD, "1")

    def no_compiling_here(*args, **kwargs):
        raise AssertionError("compiled in the process that asked")

    monkeypatch.setattr(build.tvm, "compile", no_compiling_here)
    events: list[str] = []
    art = build_model(TINY, cache_dir=tmp_path, on_event=events.append)
    assert art.cached is False and art.library.exists() and art.meta["params"]
    assert any(e.startswith("compiling RWKV-5") for e in events) and any(e.startswith("compiled in") for e in events)
    again = build_model(TINY, cache_dir=tmp_path)  # the same key: the child's entry is this process's hit
    assert again.cached is True and again.library == art.library


def test_a_compile_child_that_fails_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(host.COMPILE_IN_CHILD, "1")
    with pytest.raises(ParityError, match="in a child process failed .*no-such-bug") as err:
        build_model(TINY, cache_dir=tmp_path, mutant="no-such-bug")
    assert "\n" not in str(err.value)
