"""A copy of the MLC-style port with one realistic porting bug planted: ln_x's eps is 1e-5.

HF's RWKV-5 and MLC-LLM-style ports set GroupNorm's eps to 1e-5 * head_size_divisor ** 2 (= 64e-5
with the usual divisor 8, what ChatRWKV uses); a port that reads the config without the divisor
gets 1e-5. Everything else is the port of glue.py, unchanged.

    parity run --checkpoint fixtures/rwkv5_2-L2-C144-H12.pth \
        --backends reference,examples/mlc_rwkv5/planted.py:make_backend
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("mlc_rwkv5_glue", Path(__file__).with_name("glue.py"))
glue = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(glue)


class PlantedPort(glue.MLCStylePort):
    name = "mlc-style-rwkv5-eps1e-5"


def make_backend(checkpoint):
    return PlantedPort(checkpoint, head_size_divisor=1)  # the bug: eps = 1e-5 * 1 ** 2
