"""The one place checkpoints are read: loading, version detection, shape checks.

Every backend takes a ``Checkpoint`` from here, so they all see the same weights and the same
configuration, and a bad file is refused once, with one clear message.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from parity.errors import ParityError

if TYPE_CHECKING:
    import numpy as np
    import torch

# torch is imported where it is used, not here: a TVM worker (parity/dumpers/worker.py) runs this
# module with torch blocked (importing it costs a process ~200 MB, more with CUDA), reading the
# weights with numpy through ``MappedCheckpoint``.


class ModelVersion(str, enum.Enum):
    """RWKV generations. A string enum: versions are names, never floats compared with max()."""

    V4 = "4"
    V5_0 = "5.0"
    V5_1 = "5.1"
    V5_2 = "5.2"

    @property
    def gated(self) -> bool:
        return self in (ModelVersion.V5_1, ModelVersion.V5_2)


# What the backends of this release can run; detection knows more so the error can say what it saw.
SUPPORTED_VERSIONS = (ModelVersion.V4, ModelVersion.V5_0, ModelVersion.V5_1, ModelVersion.V5_2)


@dataclass(frozen=True)
class ModelConfig:
    version: ModelVersion
    n_layer: int
    n_embd: int  # C
    dim_att: int  # A (= C in every released model)
    dim_ffn: int  # F
    n_head: int  # H
    head_size: int  # N = A / H
    vocab_size: int  # V

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = self.version.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{**d, "version": ModelVersion(d["version"])})

    def describe(self) -> str:
        return (
            f"RWKV-{self.version.value} L{self.n_layer} C{self.n_embd} H{self.n_head} "
            f"N{self.head_size} F{self.dim_ffn} V{self.vocab_size}"
        )


# The embedding LayerNorm's eps (ln0; every RWKV LayerNorm's, and F.layer_norm's default the official
# package folds it with).
LN0_EPS = 1e-5
# TVM's DLPack import (and its kernels) need 64-byte-aligned data; torch's CPU allocator gives
# that, a memory-mapped .safetensors tensor may not (its data starts 8-byte aligned).
_ALIGN = 64
# Bytes of the file upcast between two releases of its pages (``fp32_weights``): small next to a
# released model's file (0.4B: 1.06 GB), and few enough releases (each reads /proc/self/smaps).
_RELEASE_EVERY = 128 << 20


def fold_ln0(emb, weight, bias, *, release=None):
    """``F.layer_norm(emb, (C,), weight, bias, LN0_EPS)``, a block of rows at a time: each row is
    normalised on its own, so the table is bit for bit the whole-table call's (tested), but a
    memory-mapped ``emb``'s pages can be let go (``release``) every ``_RELEASE_EVERY`` bytes read
    instead of all being resident at once beside the new table (0.2 GB at 0.1B, 0.67 GB at 3B)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty(emb.shape, dtype=torch.float32)
    rows = max(1, _RELEASE_EVERY // max(1, emb.shape[1] * emb.element_size()))
    for start in range(0, emb.shape[0], rows):
        out[start:start + rows] = F.layer_norm(emb[start:start + rows], (emb.shape[1],), weight, bias, LN0_EPS)
        if release is not None:
            release()
    return out


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # ChatRWKV key names, tensors exactly as stored (memory-mapped)
    _fp32: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    _folded: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def fp32_weights(self) -> dict[str, torch.Tensor]:
        """Every tensor as contiguous, 64-byte-aligned fp32, made once and shared by every backend.

        A real-size run holds several backends at once (reference, TVM, the official package);
        each upcasting on its own would hold one fp32 copy apiece (a 1.5B model: 6.3 GB each).
        Here an fp32 tensor stored in the file is used in place (memory-mapped, no copy); anything
        else is upcast once (bf16/fp16 -> fp32 is exact). The tensors are shared: consumers must
        never write into them. Returns a new dict each call, so a consumer may rebind its keys.
        """
        if self._fp32 is None:
            fp32, read = {}, 0
            for key, t in self.weights.items():
                fp32[key], nbytes = self._fp32_of(key, t)
                read += nbytes
                if read >= _RELEASE_EVERY:
                    # The upcast reads the file's pages; only the fp32 copies are used from here.
                    # Dropped as we go, the file and the copies are never resident in full together.
                    self.release_file_pages()
                    read = 0
            self._fp32 = fp32
            self.release_file_pages()
        return dict(self._fp32)

    def folded_embedding(self) -> "torch.Tensor":
        """The embedding table with ln0 applied to every row, in fp32, made once from ``fp32_weights``
        and shared like them (never write into it).

        The fp32 reference and the official package both fold ln0 into the table at load, with the
        same call (``F.layer_norm`` in fp32, eps 1e-5: the package's own when emb or ln0 is not
        stored in one dtype, or both are fp32), so one table serves both: a (V, C) fp32 table is
        0.2 GB at 0.1B, 0.67 GB at 3B, and the fold reads every page of the stored one.
        """
        if self._folded is None:
            w = self.fp32_weights()
            self._folded = fold_ln0(w["emb.weight"], w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"],
                                    release=self.release_file_pages)
        return self._folded

    def drop_fp32_copy(self) -> None:
        """Forget the shared fp32 copy and folded table (``fp32_weights`` makes them again when next
        asked). Their memory goes back only where no backend still holds their tensors."""
        self._fp32 = None
        self._folded = None

    def _fp32_of(self, key: str, t):
        """One tensor of ``fp32_weights`` and the bytes of the file read to make it (0: used in place)."""
        import torch

        source = t
        t = t.to(torch.float32)
        if not t.is_contiguous() or t.data_ptr() % _ALIGN:
            t = t.clone(memory_format=torch.contiguous_format)
        return t, (0 if t.data_ptr() == source.data_ptr() else source.numel() * source.element_size())

    def release_file_pages(self) -> int:
        """Drop this process's resident pages of the checkpoint file; returns the bytes dropped.

        A memory-mapped checkpoint's pages count in a process's RSS once read (checking the
        weights for NaN, upcasting bf16 to fp32, folding ln0 into the embedding), and stay there
        while the mapping lives, though nothing reads most of them again: at 0.4B that is 1.1 GB
        per process, twice over when a worker maps the same file (benchmarks/memory.py). The
        mapping stays valid: a page read again comes back from the page cache. See
        ``release_mapped_pages`` for when nothing is dropped.
        """
        path = Path(self.path)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return release_mapped_pages(files)

    def fp32_nbytes(self) -> int:
        """Bytes of the weights in fp32: what one fp32 copy of this model costs."""
        return sum(t.numel() * 4 for t in self.weights.values())


# -- the weights without torch: a TVM worker maps the file itself -------------------------------
# The stored dtypes a worker reads with numpy (numpy has no bfloat16: its bits are read as uint16).
_MAPPED_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def _file_mappings(names: set[str]) -> list[dict] | None:
    """This process's mappings of ``names``: start, end, file offset, written (anonymous) bytes.
    None where /proc/self/smaps cannot be read (not Linux)."""
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    spans, current = [], None
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # "start-end perms offset dev inode path"
            current = None
            if len(head) == 6 and head[5] in names:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = {"file": head[5], "start": start, "end": end, "offset": int(head[2], 16), "anon": 0}
                spans.append(current)
        elif current is not None and head and head[0] == "Anonymous:":
            current["anon"] = int(head[1]) * 1024
    return spans


def file_locations(ck: Checkpoint) -> dict[str, dict] | None:
    """Where each of ``ck``'s tensors lies in its file: key -> {file, offset, dtype, shape}; None
    unless that is sure for every tensor.

    Read from this process's memory maps (Linux): a tensor loaded memory-mapped (torch.load
    mmap=True, safetensors) is a view of the file, so its address minus its mapping's start, plus
    the mapping's file offset, is where its bytes are in the file. Not sure, and None: not Linux, a
    tensor not inside a mapping of the checkpoint's files (built or changed in memory, a file read
    whole), non-contiguous, empty, of a dtype other than fp32/fp16/bf16, or a mapping holding a
    written (copy-on-write) page, whose bytes may no longer be the file's. The caller then hands
    the weights over some other way.
    """
    path = Path(ck.path)
    if not path.exists():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    spans = _file_mappings({str(f.resolve()) for f in files})
    if not spans or any(s["anon"] for s in spans):
        return None
    out = {}
    for key, t in ck.weights.items():
        dtype = _MAPPED_DTYPES.get(str(getattr(t, "dtype", None)))
        if dtype is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return None
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        span = next((s for s in spans if s["start"] <= ptr and ptr + nbytes <= s["end"]), None)
        if span is None:
            return None
        out[key] = {"file": span["file"], "offset": span["offset"] + ptr - span["start"], "dtype": dtype,
                    "shape": tuple(t.shape)}
    return out


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array at a ``_ALIGN``-byte boundary (TVM's DLPack import refuses less;
    numpy's allocator gives 16)."""
    import numpy as np

    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + _ALIGN, np.uint8)
    start = -buf.ctypes.data % _ALIGN
    return buf[start:start + nbytes].view(dtype).reshape(shape)


@dataclass
class MappedCheckpoint(Checkpoint):
    """A checkpoint read with numpy, no torch: each tensor where ``file_locations`` found it.

    For a TVM worker (parity/dumpers/worker.py), whose parent has loaded and validated the file
    already (torch.load weights_only, shapes, NaN): importing torch would cost the worker ~200 MB
    and buy it nothing. The file is mapped copy-on-write, like torch's mmap=True, and never
    unpickled. ``weights`` holds numpy views of the file as stored, bf16 as its raw uint16 bits
    (``stored`` names each one's dtype); ``fp32_weights`` gives what Checkpoint.fp32_weights
    gives, bit for bit, as numpy arrays.
    """

    stored: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def _fp32_of(self, key: str, a):
        """As Checkpoint's, with numpy: fp32 stored at a 64-byte boundary used in place, anything
        else converted once into an aligned copy (bf16 -> fp32: the bits shifted up 16, exact;
        fp16 -> fp32 exact). ``fp32_weights`` (inherited) gives Checkpoint's tensors bit for bit,
        as numpy arrays, the file's pages released as it goes. Shared: never write into them."""
        import numpy as np

        kind = self.stored[key]
        if kind == "float32" and a.ctypes.data % _ALIGN == 0:
            return a, 0
        out = aligned_empty(a.shape, np.float32)
        if kind == "bfloat16":
            bits = out.view(np.uint32)
            bits[...] = a
            bits <<= 16
        else:
            out[...] = a
        return out, a.nbytes

    def fp32_nbytes(self) -> int:
        return sum(a.size * 4 for a in self.weights.values())


def open_mapped(*, path: Path, sha256: str, config: ModelConfig, locations: dict[str, dict]) -> MappedCheckpoint:
    """The checkpoint ``file_locations`` described, mapped here with numpy (copy-on-write, as
    torch maps it: TVM's DLPack import wants writable arrays; nothing writes)."""
    import mmap

    import numpy as np

    kinds = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
    maps: dict[str, mmap.mmap] = {}
    weights, stored = {}, {}
    for key, loc in locations.items():
        if loc["file"] not in maps:
            with open(loc["file"], "rb") as f:
                maps[loc["file"]] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = np.dtype(kinds[loc["dtype"]])
        count = int(np.prod(loc["shape"], dtype=np.int64))
        weights[key] = np.frombuffer(maps[loc["file"]], dtype=dtype, count=count, offset=loc["offset"]).reshape(loc["shape"])
        stored[key] = loc["dtype"]
    return MappedCheckpoint(path=Path(path), sha256=sha256, config=config, weights=weights, stored=stored)


_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def release_mapped_pages(files: list[Path]) -> int:
    """``madvise(MADV_DONTNEED)`` every mapping of ``files`` in this process; the bytes it held.

    Only clean mappings: a torch .pth is mapped private (copy-on-write), and dropping a page
    someone had written into would silently bring back the file's bytes, so a mapping holding any
    written (anonymous) page is left alone. Weights are never written (``fp32_weights``), so in
    practice every mapping is clean. Linux only (/proc/self/smaps); elsewhere it drops nothing.
    """
    names = {str(Path(f).resolve()) for f in files}
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    spans, current = [], None
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line: "start-end perms ..."
            current = None
            if len(head) == 6 and head[5] in names:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = {"start": start, "end": end, "rss": 0, "anon": 0}
                spans.append(current)
        elif current is not None and head[0] in ("Rss:", "Anonymous:"):
            current["rss" if head[0] == "Rss:" else "anon"] = int(head[1]) * 1024
    spans = [s for s in spans if s["rss"] and not s["anon"]]
    if not spans:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for s in spans:
        if libc.madvise(s["start"], s["end"] - s["start"], _MADV_DONTNEED) == 0:
            dropped += s["rss"]
    return dropped


def detect_version(weights: dict[str, torch.Tensor]) -> ModelVersion:
    """Version detection as the official package does it (docs/RWKV.md §1)."""
    keys = list(weights)
    if any("time_maa" in k for k in keys) or any(k.endswith("att.w0") for k in keys):
        raise ParityError("checkpoint is RWKV-6 or later (time_maa / w0 keys); only RWKV-4 and RWKV-5 are in scope")
    if not any(".ln_x." in k for k in keys):
        return ModelVersion.V4
    if not any("att.gate.weight" in k for k in keys):
        return ModelVersion.V5_0
    decay = weights.get("blocks.0.att.time_decay")
    if decay is not None and decay.dim() == 2 and decay.shape[1] > 1:
        return ModelVersion.V5_2
    return ModelVersion.V5_1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    """An HF ``RwkvForCausalLM`` directory (config.json + weights), renamed to ChatRWKV keys."""
    import json

    from parity.hf_names import hf_to_chatrwkv

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ParityError(f"cannot read {path / 'config.json'}: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "rwkv":
        raise ParityError(f"{path / 'config.json'} is not an HF RWKV (model_type 'rwkv') config")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            raw = _read_state_dict(path / name)
            break
    else:
        raise ParityError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")
    weights = {hf_to_chatrwkv(k): v for k, v in raw.items()}
    # The config must describe these weights: a mismatch means a mixed-up directory.
    emb = weights.get("emb.weight")
    if emb is not None:
        for field, got in (("vocab_size", emb.shape[0]), ("hidden_size", emb.shape[1])):
            if field in cfg and cfg[field] != got:
                raise ParityError(f"{path / 'config.json'} says {field} {cfg[field]}, but the weights have {got}")
    layers = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    if "num_hidden_layers" in cfg and layers and cfg["num_hidden_layers"] != max(layers) + 1:
        raise ParityError(
            f"{path / 'config.json'} says num_hidden_layers {cfg['num_hidden_layers']}, but the weights have {max(layers) + 1}"
        )
    return weights


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        # Files written by torch < 1.6 (not a zip archive) cannot be memory-mapped: read them whole.
        if "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():  # before torch's import (~2 s): a mistyped path is a one-line error at once
        raise ParityError(f"checkpoint not found: {path}")
    import torch
    if path.is_dir():
        if (path / "config.json").exists():
            return _read_hf_dir(path)
        raise ParityError(f"checkpoint path is a directory without config.json; expected a .pth, .safetensors or HF directory: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            # load_file memory-maps the file: tensors are views of the page cache, not copies.
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ParityError(f"cannot read safetensors checkpoint {path}: {exc}") from None
    try:
        # weights_only: a .pth is a pickle, and a pickle can run code; we never unpickle objects.
        # mmap: tensors are views of the file, so a 3 GB checkpoint costs no private memory; only
        # pages a backend reads come in (from the page cache, shared with other processes).
        obj = _torch_load(path)
    except Exception as exc:  # torch raises many types for bad bytes; none may escape as a traceback
        # Our own words, never torch's: its message suggests weights_only=False, which is the
        # one thing a user of this tool must not do with an untrusted file.
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise ParityError(
                f"refusing to load {path}: it pickles the Python object {unsafe.group(1)}, not just tensors; "
                "only weights_only-safe checkpoints are accepted"
            ) from None
        raise ParityError(f"cannot read checkpoint {path}: corrupt, truncated or not a torch .pth file") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ParityError(f"checkpoint {path} is not a state dict of tensors")
    return obj


def _expect(weights: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path) -> None:
    if key not in weights:
        raise ParityError(f"checkpoint {path} is missing key {key!r}")
    got = tuple(weights[key].shape)
    if got != shape:
        raise ParityError(f"checkpoint {path}: {key} has shape {got}, expected {shape}")


def infer_config(weights: dict[str, torch.Tensor], *, path: Path) -> ModelConfig:
    for key in ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight", "head.weight"):
        if key not in weights:
            raise ParityError(f"checkpoint {path} is missing key {key!r}; is it an RWKV (ChatRWKV layout) checkpoint?")
    version = detect_version(weights)
    vocab, n_embd = weights["emb.weight"].shape
    dim_att = weights["blocks.0.att.key.weight"].shape[0]
    dim_ffn = weights["blocks.0.ffn.key.weight"].shape[0]
    layers = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    n_layer = max(layers) + 1
    if layers != set(range(n_layer)):
        raise ParityError(f"checkpoint {path}: layers {sorted(set(range(n_layer)) - layers)} are missing")
    if version == ModelVersion.V4:
        n_head, head_size = 1, dim_att
    else:
        n_head = weights["blocks.0.att.time_decay"].shape[0]
        if n_head == 0 or dim_att % n_head:
            raise ParityError(f"checkpoint {path}: dim_att {dim_att} is not a multiple of the head count {n_head}")
        head_size = dim_att // n_head
    return ModelConfig(
        version=version,
        n_layer=n_layer,
        n_embd=n_embd,
        dim_att=dim_att,
        dim_ffn=dim_ffn,
        n_head=n_head,
        head_size=head_size,
        vocab_size=vocab,
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor a checkpoint of this config must hold (docs/RWKV.md §1)."""
    C, A, F, V, H, N = (config.n_embd, config.dim_att, config.dim_ffn, config.vocab_size, config.n_head, config.head_size)
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "head.weight": (V, C),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
    }
    for layer in range(config.n_layer):
        b = f"blocks.{layer}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        for mix in ("k", "v", "r"):
            shapes[f"{b}att.time_mix_{mix}"] = (1, 1, C)
        for name in ("key", "value", "receptance"):
            shapes[f"{b}att.{name}.weight"] = (A, C)
        shapes[f"{b}att.output.weight"] = (C, A)
        shapes[f"{b}ffn.time_mix_k"] = (1, 1, C)
        shapes[f"{b}ffn.time_mix_r"] = (1, 1, C)
        shapes[f"{b}ffn.key.weight"] = (F, C)
        shapes[f"{b}ffn.receptance.weight"] = (C, C)
        shapes[f"{b}ffn.value.weight"] = (C, F)
        if config.version == ModelVersion.V4:
            shapes[f"{b}att.time_decay"] = (A,)
            shapes[f"{b}att.time_first"] = (A,)
            continue
        shapes[f"{b}att.ln_x.weight"] = (A,)
        shapes[f"{b}att.ln_x.bias"] = (A,)
        if config.version.gated:
            shapes[f"{b}att.time_mix_g"] = (1, 1, C)
            shapes[f"{b}att.gate.weight"] = (A, C)
        if config.version == ModelVersion.V5_2:
            shapes[f"{b}att.time_decay"] = (H, N)
            shapes[f"{b}att.time_faaaa"] = (H, N)
        else:
            shapes[f"{b}att.time_decay"] = (H,)
            shapes[f"{b}att.time_first"] = (H,)
    return shapes


def validate(weights: dict[str, torch.Tensor], config: ModelConfig, *, path: Path) -> None:
    for key, shape in expected_shapes(config).items():
        _expect(weights, key, shape, path)
    for key, t in weights.items():
        if not t.is_floating_point():
            raise ParityError(f"checkpoint {path}: {key} has dtype {t.dtype}, expected a floating-point tensor")


# Elements checked at a time: the bool mask of one chunk is 16 MB, whatever the tensor's size (a 3B
# model's embedding alone is 168 M elements), and each chunk is read from the file once.
_FINITE_CHUNK = 1 << 24


def check_finite(weights: dict[str, torch.Tensor], *, path: Path) -> None:
    """Refuse NaN/Inf weights, naming the tensors and how many values: a non-finite weight would
    otherwise surface later as "non-finite values in both" at some stage, far from its cause."""
    import torch

    bad: list[tuple[str, int, int]] = []  # key, non-finite count, element count
    for key, t in weights.items():
        flat = t.reshape(-1)
        count = 0
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            chunk = flat[start:start + _FINITE_CHUNK]
            if not bool(torch.isfinite(chunk).all()):
                count += int((~torch.isfinite(chunk)).sum())
        if count:
            bad.append((key, count, flat.numel()))
    if bad:
        named = ", ".join(f"{key} ({count} of {numel})" for key, count, numel in bad[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise ParityError(f"checkpoint {path} has NaN/Inf weights: {named}{more}; the file is damaged "
                          "or was saved from a diverged training run")


def load_checkpoint(path: str | Path, *, require_supported: bool = True) -> Checkpoint:
    """Read, detect and validate a checkpoint; raise ParityError with one clear line otherwise."""
    path = Path(path)
    weights = _read_state_dict(path)
    config = infer_config(weights, path=path)
    validate(weights, config, path=path)
    check_finite(weights, path=path)
    if require_supported and config.version not in SUPPORTED_VERSIONS:
        supported = ", ".join(v.value for v in SUPPORTED_VERSIONS)
        raise ParityError(
            f"checkpoint {path} is RWKV-{config.version.value}; this release runs RWKV-{supported} only"
        )
    ck = Checkpoint(path=path, sha256=_sha256(path), config=config, weights=weights)
    ck.release_file_pages()  # check_finite read every page; none is needed until a backend reads it
    return ck


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write ``checkpoint`` as a ChatRWKV .pth, a .safetensors with the same keys, or (v4) an HF directory.

    The format follows the destination: ``*.pth``, ``*.safetensors``, anything else is a directory.
    Tensors are written as stored (no dtype change), so a round trip is bit-exact.
    """
    import torch

    path = Path(path)
    weights = {k: v.contiguous() for k, v in checkpoint.weights.items()}
    if path.suffix == ".pth":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path))
    else:
        if checkpoint.config.version != ModelVersion.V4:
            raise ParityError(
                f"HF directories hold RWKV-4 only (RwkvForCausalLM); this checkpoint is RWKV-{checkpoint.config.version.value}"
            )
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ParityError(f"{path} exists and is not an empty directory; choose a new directory")
        import json

        from safetensors.torch import save_file

        from parity.hf_names import chatrwkv_to_hf, hf_config

        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf_config(checkpoint.config), indent=2) + "\n")
        save_file({chatrwkv_to_hf(k): v for k, v in weights.items()}, str(path / "model.safetensors"))
    return path
