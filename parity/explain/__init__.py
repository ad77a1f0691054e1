"""``parity explain``: from *where* a port diverges to *why*.

At the first faulty stage, the torch reference re-runs that layer on the candidate's own recorded
inputs and state (the replay, parity/dumpers/replay.py) once clean and once with each known porting
bug of the stage's family planted (hypotheses.py). The hypotheses are ranked by how exactly each
reproduces the candidate's recorded tensors (engine.py); "explained" only when one reproduces them
within the dtype's tolerance while the clean reference does not.
"""

from __future__ import annotations
