"""The capture kit: check a TVM / Relax VM build you did not write against the reference.

Three pieces, each usable alone (docs/backends.md, "Capturing a TVM build"):

- ``KernelRecorder`` wraps your ``tvm.runtime.vm.VirtualMachine`` and records every kernel call
  (its symbol and a copy of its outputs) made while a ``recording()`` block runs;
- ``CallNamer`` names the recorded calls by canonical stage with ``Rule``s you state in a few
  lines (kernel-name patterns, call order within a layer via ``layers``, output shapes); what no
  rule names stays ``kernel.<n>.<symbol>``, which a plug-in may return as it is;
- layout adapters (``drop_batch``, ``hvk_to_hkv``, ``flatten_heads``) and ``RNNStateReader`` for
  TVM's runtime RNN state object, so state and stages arrive in the canonical layout.

The plug-in contract itself is unchanged: your ``step(ids)`` returns the dict these build.
"""

from parity.capture.record import KernelCall, KernelRecorder, outputs_from_module
from parity.capture.rules import CallNamer, Rule, kernel_record_name, layers
from parity.capture.state import RNNStateReader, drop_batch, flatten_heads, hvk_to_hkv, name_state, rows_view

__all__ = [
    "CallNamer",
    "KernelCall",
    "KernelRecorder",
    "RNNStateReader",
    "Rule",
    "drop_batch",
    "flatten_heads",
    "hvk_to_hkv",
    "kernel_record_name",
    "layers",
    "name_state",
    "outputs_from_module",
    "rows_view",
]
