"""TVM's known-harmless compile warning is dropped from C-level stderr; every other byte passes."""

from __future__ import annotations

import os

from parity.dumpers.quiet import known_tvm_warnings_hidden

WARNING = ("[04:25:03] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults when there are "
           "out-of-bounds indices. Make sure input indices are in bound\n")


def test_only_the_known_warning_is_dropped(capfd):
    with known_tvm_warnings_hidden():
        os.write(2, WARNING.encode())  # as TVM's C++ logger writes it: below Python's sys.stderr
        os.write(2, b"some other warning\n")
        os.write(2, WARNING.encode())
    err = capfd.readouterr().err
    assert err == "some other warning\n"


def test_output_is_replayed_even_when_the_build_fails(capfd):
    try:
        with known_tvm_warnings_hidden():
            os.write(2, b"the compiler said why\n")
            raise RuntimeError("build failed")
    except RuntimeError:
        pass
    assert capfd.readouterr().err == "the compiler said why\n"
    os.write(2, b"after\n")  # stderr is the real one again
    assert capfd.readouterr().err == "after\n"
