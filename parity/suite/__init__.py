"""The parity suite: ``pytest parity/`` runs every bundled fixture through every backend.

Unlike ``tests/`` (unit tests of the harness itself), these tests judge the *models*: the torch
reference against the TVM-compiled model, in both capture modes, and each backend against itself
(prefill vs step-by-step decode, chunked prefill).
"""
