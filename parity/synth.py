"""``parity synth``: a checkpoint of a released RWKV shape, with realistic random weights.

    parity synth --shape 0.1b|0.4b|1.5b|3b|7b --version 4|5.0|5.1|5.2 [--seed S] [--layers N] [--vocab V] [--force] OUT

So anyone can reproduce a run at a real model size without downloading weights. The weights come
from parity/synthetic.py (the training init's structure, docs/RWKV.md §6), stored as released
checkpoints and our fixtures are: bf16, emb.weight fp32. OUT is a ``.pth`` or ``.safetensors``.

Written part by part (the embedding, each layer, the head): a safetensors file is laid out from
the known shapes first, then each part is written into place as it is generated, so memory holds
one layer, not the model. A ``.pth`` cannot be written piecewise (torch.save takes one dict), so it
is saved from that file memory-mapped, then the temporary file goes. Either way OUT appears only
when complete: an interrupted run leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from parity.checkpoint import ModelConfig, ModelVersion, expected_shapes
from parity.errors import ParityError


@dataclass(frozen=True)
class ReleasedShape:
    n_layer: int
    n_embd: int


# The RWKV World models (docs/guide.md, "Released shapes"). Every one has V = 65536 and, for RWKV-5,
# head size 64; RWKV-4 Pile/World models of the same names have the same L and C.
SHAPES = {
    "0.1b": ReleasedShape(n_layer=12, n_embd=768),
    "0.4b": ReleasedShape(n_layer=24, n_embd=1024),
    "1.5b": ReleasedShape(n_layer=24, n_embd=2048),
    "3b": ReleasedShape(n_layer=32, n_embd=2560),
    "7b": ReleasedShape(n_layer=32, n_embd=4096),
}
VOCAB_SIZE = 65536
HEAD_SIZE = 64

_ST_DTYPES = {"torch.bfloat16": "BF16", "torch.float32": "F32"}  # str(dtype): torch is imported only to write
# The data section starts 64-byte aligned and every tensor of these shapes is a multiple of 64
# bytes, so each tensor is aligned too: an fp32 tensor (emb.weight) is then used in place,
# memory-mapped, by Checkpoint.fp32_weights instead of being copied.
_ALIGN = 64

Progress = Callable[[str], None]


def shape_config(shape: str, *, version: str, layers: int | None = None, vocab: int | None = None) -> ModelConfig:
    """The ModelConfig of a released shape; ``layers`` and ``vocab`` override its depth and vocabulary
    for quick runs (the head's orthogonal init costs 2·V·C² flops: ~20 s at V = 65536, C = 768)."""
    from parity.synthetic import make_config

    if shape not in SHAPES:
        raise ParityError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    try:
        ModelVersion(version)
    except ValueError:
        raise ParityError(f"unknown version {version!r}; choose one of {', '.join(v.value for v in ModelVersion)}") from None
    if layers is not None and layers < 1:
        raise ParityError(f"--layers must be at least 1, got {layers}")
    if vocab is not None and vocab < 1:
        raise ParityError(f"--vocab must be at least 1, got {vocab}")
    s = SHAPES[shape]
    return make_config(n_layer=layers or s.n_layer, n_embd=s.n_embd, head_size=HEAD_SIZE,
                       vocab_size=vocab or VOCAB_SIZE, version=version)


def _stored_dtype(key: str) -> torch.dtype:
    import torch

    from parity.synthetic import stored

    return stored(key, torch.zeros(1)).dtype


def _layout(config: ModelConfig) -> tuple[bytes, dict[str, int], int]:
    """The safetensors header for ``config``, each tensor's byte offset from the file's start, and
    the file's size."""
    entries, offsets, pos = {}, {}, 0
    for key, shape in expected_shapes(config).items():
        dtype = _stored_dtype(key)
        nbytes = dtype.itemsize * math.prod(shape)
        entries[key] = {"dtype": _ST_DTYPES[str(dtype)], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[key] = pos
        pos += nbytes
    entries["__metadata__"] = {"format": "pt", "generator": "parity synth"}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % _ALIGN)  # safetensors allows trailing spaces in its header
    start = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, {k: start + v for k, v in offsets.items()}, start + pos


def synthesize(
    out: str | Path,
    *,
    shape: str,
    version: str,
    seed: int = 0,
    layers: int | None = None,
    vocab: int | None = None,
    force: bool = False,
    on_progress: Progress | None = None,
) -> tuple[Path, ModelConfig]:
    """Write a checkpoint of ``shape`` to ``out`` (.pth or .safetensors); returns (path, config)."""
    import torch

    from parity.synthetic import iter_weights, stored

    out = Path(out)
    if out.suffix not in (".pth", ".safetensors"):
        raise ParityError(f"{out}: the output must end in .pth or .safetensors")
    if out.exists() and not force:
        raise ParityError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise ParityError(f"{out} is a directory")
    config = shape_config(shape, version=version, layers=layers, vocab=vocab)
    say = on_progress or (lambda msg: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    header, offsets, size = _layout(config)
    need = size * (2 if out.suffix == ".pth" else 1)  # a .pth goes through a temporary file
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise ParityError(f"{out.parent} has {free / 1e9:.1f} GB free; this checkpoint needs {need / 1e9:.1f} GB")

    expected = expected_shapes(config)
    tmp = out.with_name(f".{out.name}.partial.safetensors")
    written: set[str] = set()
    started = time.monotonic()
    try:
        with tmp.open("wb") as f:
            f.write(header)
            f.truncate(size)
            parts = iter_weights(config, seed=seed)
            for i, part in enumerate(parts):
                for key, t in part.items():
                    t = stored(key, t)
                    if tuple(t.shape) != expected.get(key):
                        raise AssertionError(f"generator made {key} {tuple(t.shape)}, layout expects {expected.get(key)}")
                    f.seek(offsets[key])
                    f.write(t.view(torch.uint8).numpy())  # raw little-endian bytes, as safetensors stores them
                    written.add(key)
                what = "embedding" if i == 0 else f"layer {i - 1}" if i <= config.n_layer else "head"
                say(f"{what} done ({i + 1}/{config.n_layer + 2} parts, {time.monotonic() - started:.0f} s)")
        if written != set(expected):
            raise AssertionError(f"generator left {sorted(set(expected) - written)[:3]} unwritten")
        if out.suffix == ".pth":
            from safetensors.torch import load_file

            pth_tmp = out.with_name(f".{out.name}.partial")
            torch.save(load_file(str(tmp)), pth_tmp)  # load_file maps the file: no second copy in memory
            os.replace(pth_tmp, out)
            tmp.unlink()
        else:
            os.replace(tmp, out)
    finally:
        for leftover in (tmp, out.with_name(f".{out.name}.partial")):
            leftover.unlink(missing_ok=True)
    return out, config


# -- CLI ----------------------------------------------------------------------------------------
def add_synth_parser(subparsers):
    p = subparsers.add_parser(
        "synth", help="write a checkpoint of a released RWKV shape (0.1b … 7b) with realistic random weights",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="the checkpoint to write: *.pth or *.safetensors")
    p.add_argument("--shape", required=True, choices=list(SHAPES), help="the released model size (docs/guide.md, 'Released shapes')")
    p.add_argument("--version", required=True, choices=[v.value for v in ModelVersion], help="RWKV version")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives the same weights")
    p.add_argument("--layers", type=int, metavar="N", help="only N layers (the shape's width; for quick runs)")
    p.add_argument("--vocab", type=int, metavar="V", help=f"a vocabulary of V tokens (default {VOCAB_SIZE}; smaller for quick runs)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress; only the final line")
    return p


def cmd_synth(args, console) -> int:
    import sys

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"synth: {msg}", file=sys.stderr, flush=True)

    out, config = synthesize(args.out, shape=args.shape, version=args.version, seed=args.seed, layers=args.layers,
                             vocab=args.vocab, force=args.force, on_progress=progress)
    size = out.stat().st_size
    fp32 = sum(math.prod(s) for s in expected_shapes(config).values()) * 4
    console.print(f"wrote {out} ({config.describe()}, seed {args.seed}; {size / 1e9:.2f} GB on disk, "
                  f"{fp32 / 1e9:.2f} GB as fp32)")
    return 0
