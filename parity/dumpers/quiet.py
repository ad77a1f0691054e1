"""Keep TVM's one known-harmless compile warning out of the output; pass everything else through.

TVM's compiler (C++, so below Python's ``warnings``) prints, three times per compile of every model:

    .../topi/transform.h:1261: Warning: Fast mode segfaults when there are out-of-bounds indices.
    Make sure input indices are in bound

It comes from ``take`` in fast mode (the embedding lookup and row gathers), which skips the bounds
check. Here that is harmless: every token id is checked against the vocabulary before anything runs
(``RunPlan.check``), and the other gathers index rows the graph itself computes. A newcomer seeing
"segfaults" three times cannot know that, so backends are built inside ``known_tvm_warnings_hidden``:
C-level stderr goes to a temporary file while the build runs and is replayed without those lines
(docs/backends.md, "What the output leaves out"). Nothing else is dropped; output is only delayed
until the build returns.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

KNOWN_HARMLESS = ("Fast mode segfaults when there are out-of-bounds indices",)


@contextlib.contextmanager
def known_tvm_warnings_hidden():
    """File descriptor 2 (where TVM's C++ logger writes, whatever ``sys.stderr`` is) goes to a
    temporary file for the duration; then its bytes go back to fd 2, less the known lines."""
    with contextlib.suppress(Exception):  # Python-level text written before must come out first
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().splitlines(keepends=True)
                    if not any(text.encode() in line for text in KNOWN_HARMLESS)]
            data = b"".join(kept)
            while data:  # a pipe may take less than all of it at once
                data = data[os.write(2, data):]
