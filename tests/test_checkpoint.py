"""Checkpoint loading: the bundled fixtures, version detection, and every way a file can be bad.

A bad checkpoint must be refused with one ParityError line that names the problem; an unsafe
pickle must be refused *without* running its payload.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.checkpoint import (
    SUPPORTED_VERSIONS,
    ModelConfig,
    ModelVersion,
    detect_version,
    expected_shapes,
    load_checkpoint,
)
from parity.errors import ParityError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
FIXTURE_H2 = FIXTURES / "rwkv5_2-L4-C128-H2.pth"
FIXTURE_HN = FIXTURES / "rwkv5_2-L2-C144-H12.pth"


def tiny_config(version: ModelVersion, *, n_embd: int = 16, dim_att: int = 16) -> ModelConfig:
    # H != N (2 heads of 8) so that an (H,N) / (N,H) mix-up changes a shape.
    n_head = 1 if version == ModelVersion.V4 else 2
    return ModelConfig(
        version=version,
        n_layer=2,
        n_embd=n_embd,
        dim_att=dim_att,
        dim_ffn=32,
        n_head=n_head,
        head_size=dim_att // n_head,
        vocab_size=32,
    )


def state_dict_for(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict with exactly the keys and shapes ``config`` needs; values do not matter here."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in expected_shapes(config).items()}


def save(weights, path: Path) -> Path:
    torch.save(weights, path)
    return path


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(ParityError) as info:
        load_checkpoint(path, **kwargs)
    msg = str(info.value)
    # One plain line: it is printed after "parity: error: " on a terminal, so no newlines and no
    # escape codes carried over from a library's own message.
    assert msg.isprintable(), f"error message is not one plain line: {msg!r}"
    # A refusal must never advise the one thing it exists to prevent.
    assert "weights_only` set to `False`" not in msg, f"error message advises an unsafe load: {msg!r}"
    return msg


# -- the bundled fixtures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (FIXTURE_H2, dict(n_layer=4, n_embd=128, dim_att=128, n_head=2, head_size=64, vocab_size=1024)),
        (FIXTURE_HN, dict(n_layer=2, n_embd=144, dim_att=144, n_head=12, head_size=12, vocab_size=1024)),
    ],
    ids=["L4-C128-H2", "L2-C144-H12"],
)
def test_bundled_fixture_loads_with_its_config(path, expected):
    ck = load_checkpoint(path)
    cfg = ck.config
    assert cfg.version == ModelVersion.V5_2
    assert {k: getattr(cfg, k) for k in expected} == expected
    # v5 FFN width: int(3.5 C) rounded down to a multiple of 32.
    assert cfg.dim_ffn == int(3.5 * cfg.n_embd) // 32 * 32
    assert len(ck.sha256) == 64 and int(ck.sha256, 16) >= 0
    assert set(ck.weights) == set(expected_shapes(cfg))
    assert ck.weights["blocks.0.att.time_decay"].shape == (cfg.n_head, cfg.head_size)


def test_config_round_trips_through_dict():
    cfg = load_checkpoint(FIXTURE_H2).config
    d = cfg.to_dict()
    assert d["version"] == "5.2"
    assert ModelConfig.from_dict(d) == cfg


def test_fixtures_match_their_generator():
    proc = subprocess.run(
        [sys.executable, str(FIXTURES / "make_fixtures.py"), "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every bundled file was checked, not just the first few.
    for path in FIXTURES.glob("*.pth"):
        assert f"{path.name}: matches the generator" in proc.stdout, proc.stdout


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pth")), ids=lambda p: p.stem)
def test_every_bundled_fixture_is_the_version_its_name_says(path):
    # "rwkv5_2-..." -> 5.2, "rwkv4-..." -> 4
    named = path.name.split("-")[0].removeprefix("rwkv").replace("_", ".")
    ck = load_checkpoint(path, require_supported=False)
    assert ck.config.version.value == named


# -- version detection ------------------------------------------------------------------------


@pytest.mark.parametrize("version", list(ModelVersion), ids=lambda v: f"v{v.value}")
def test_detect_version_from_keys_and_decay_shape(version):
    assert detect_version(state_dict_for(tiny_config(version))) == version


def test_detect_version_needs_a_2d_decay_with_more_than_one_column_for_5_2():
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights["blocks.0.att.time_decay"] = torch.zeros(2, 1)
    assert detect_version(weights) == ModelVersion.V5_1


def test_version_dicts_have_the_keys_detection_looks_for():
    # The distinguishing keys really are absent/present in the dicts the tests above rely on.
    v4 = state_dict_for(tiny_config(ModelVersion.V4))
    v50 = state_dict_for(tiny_config(ModelVersion.V5_0))
    v51 = state_dict_for(tiny_config(ModelVersion.V5_1))
    assert not any(".ln_x." in k for k in v4)
    assert any(".ln_x." in k for k in v50) and not any("gate.weight" in k for k in v50)
    assert any("gate.weight" in k for k in v51) and v51["blocks.0.att.time_decay"].dim() == 1


@pytest.mark.parametrize("key", ["blocks.0.att.time_maa_x", "blocks.0.att.time_maa_w1", "blocks.0.att.w0"])
def test_rwkv6_keys_are_refused(key):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights[key] = torch.zeros(1, 1, 16)
    with pytest.raises(ParityError, match="RWKV-6"):
        detect_version(weights)


def test_rwkv6_checkpoint_file_is_refused(tmp_path):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights["blocks.0.att.time_maa_x"] = torch.zeros(1, 1, 16)
    assert "RWKV-6" in load_error(save(weights, tmp_path / "v6.pth"))


@pytest.mark.parametrize("version", list(ModelVersion), ids=lambda v: f"v{v.value}")
def test_each_version_loads_with_the_config_it_was_made_from(tmp_path, version):
    config = tiny_config(version)
    path = save(state_dict_for(config), tmp_path / "model.pth")
    assert load_checkpoint(path, require_supported=False).config == config
    if version in SUPPORTED_VERSIONS:
        assert load_checkpoint(path).config == config


@pytest.mark.parametrize("version", [ModelVersion.V4, ModelVersion.V5_0], ids=lambda v: f"v{v.value}")
def test_unsupported_version_is_refused_naming_it(tmp_path, monkeypatch, version):
    # Which versions are supported changes between releases; the refusal must not. Pretend this
    # release runs 5.2 only.
    monkeypatch.setattr("parity.checkpoint.SUPPORTED_VERSIONS", (ModelVersion.V5_2,))
    path = save(state_dict_for(tiny_config(version)), tmp_path / "old.pth")
    msg = load_error(path)
    assert f"RWKV-{version.value};" in msg
    assert "5.2" in msg  # says what *is* supported


# -- files that are not checkpoints -----------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    msg = load_error(path)
    assert "not found" in msg and str(path) in msg


def test_directory(tmp_path):
    msg = load_error(tmp_path)
    assert "directory" in msg and str(tmp_path) in msg


def test_random_bytes(tmp_path):
    # Many seeds in one test: random bytes reach different corners of the unpickler (a bad
    # opcode, an empty stack, a missing memo entry), and every one must end as a corrupt-file
    # ParityError; the failure lists every seed that did not.
    path = tmp_path / "garbage.pth"
    problems = []
    for seed in range(40):
        path.write_bytes(random.Random(seed).randbytes(4096))
        try:
            msg = load_error(path)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the seed
            problems.append(f"seed {seed}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if str(path) not in msg or not ("corrupt" in msg or "cannot read" in msg or "not a torch" in msg):
            problems.append(f"seed {seed}: message does not say the file is corrupt: {msg[:160]}")
    assert not problems, f"{len(problems)}/40 garbage files mishandled:\n" + "\n".join(problems)


def test_random_bytes_as_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    msg = load_error(path)
    assert str(path) in msg and "cannot read" in msg


def test_truncated_real_checkpoint(tmp_path):
    data = FIXTURE_HN.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(path)
    assert str(path) in msg and "corrupt" in msg


def test_not_a_state_dict(tmp_path):
    path = save([torch.zeros(3), torch.ones(3)], tmp_path / "list.pth")
    assert "not a state dict of tensors" in load_error(path)


# -- unsafe pickles: refused, payload never runs ----------------------------------------------


class _Payload:
    """Unpickling this calls open(marker, "w"), creating the marker file: code run by a load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_payload_runs_under_a_plain_unpickler(tmp_path):
    # The control for the tests below: if a loader unpickled freely, the marker would appear.
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


def test_torch_saved_object_with_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights["blocks.0.att.evil"] = _Payload(marker)
    path = save(weights, tmp_path / "unsafe.pth")
    assert not marker.exists()
    msg = load_error(path)
    assert "refusing to load" in msg and str(path) in msg
    assert not marker.exists(), "loading the checkpoint ran code from the pickle"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_plain_pickle_of_custom_class_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "plain.pth"
    with path.open("wb") as f:
        pickle.dump({"emb.weight": torch.zeros(2, 2), "x": _Payload(marker)}, f)
    msg = load_error(path)
    assert str(path) in msg
    assert not marker.exists(), "loading the checkpoint ran code from the pickle"


# -- well-formed files with the wrong contents ------------------------------------------------


@pytest.mark.parametrize("key", ["blocks.1.ffn.value.weight", "ln_out.bias", "blocks.0.att.time_faaaa"])
def test_missing_key_is_named(tmp_path, key):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    del weights[key]
    msg = load_error(save(weights, tmp_path / "m.pth"))
    assert f"missing key {key!r}" in msg


def test_missing_structural_key_says_it_may_not_be_rwkv(tmp_path):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    del weights["head.weight"]
    msg = load_error(save(weights, tmp_path / "m.pth"))
    assert "'head.weight'" in msg and "RWKV" in msg


def test_missing_layer_is_named(tmp_path):
    config = dataclasses.replace(tiny_config(ModelVersion.V5_2), n_layer=3)
    weights = {k: v for k, v in state_dict_for(config).items() if not k.startswith("blocks.1.")}
    msg = load_error(save(weights, tmp_path / "gap.pth"))
    assert "layers [1] are missing" in msg


def test_transposed_att_key_where_c_differs_from_a(tmp_path):
    # With C = A a transposed (A,C) matrix keeps its shape; only C != A can catch it.
    weights = state_dict_for(tiny_config(ModelVersion.V5_2, n_embd=16, dim_att=32))
    key = "blocks.1.att.key.weight"
    weights[key] = weights[key].T.contiguous()
    msg = load_error(save(weights, tmp_path / "t.pth"))
    assert key in msg and "(16, 32)" in msg and "expected (32, 16)" in msg


def test_transposed_time_decay(tmp_path):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))  # H = 2, N = 8
    key = "blocks.1.att.time_decay"
    weights[key] = weights[key].T.contiguous()
    msg = load_error(save(weights, tmp_path / "d.pth"))
    assert key in msg and "(8, 2)" in msg and "expected (2, 8)" in msg


def test_flat_time_decay_in_a_5_2_checkpoint(tmp_path):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    key = "blocks.1.att.time_decay"
    weights[key] = weights[key].reshape(-1)
    msg = load_error(save(weights, tmp_path / "d.pth"))
    assert key in msg and "(16,)" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_float_tensor(tmp_path, dtype):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights["ln_out.weight"] = torch.ones(16, dtype=dtype)
    msg = load_error(save(weights, tmp_path / "i.pth"))
    assert "ln_out.weight" in msg and str(dtype) in msg and "floating-point" in msg


# -- memory-mapped loading and the one shared fp32 copy ------------------------------------------


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


def _mapped_from(t: torch.Tensor, path: Path) -> bool:
    ptr = t.data_ptr()
    return any(start <= ptr < end and Path(name) == path for start, end, name in _mapped_files())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see mappings")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_tensors_are_views_of_the_file_not_copies(tmp_path, suffix):
    from parity.checkpoint import save_checkpoint

    source = load_checkpoint(FIXTURE_H2)
    path = save_checkpoint(source, tmp_path / f"model{suffix}")
    ck = load_checkpoint(path)
    big = ck.weights["head.weight"]  # 1024 x 128 bf16: 256 KB, far more than any header
    assert _mapped_from(big, path.resolve()), "head.weight is not memory-mapped from the checkpoint file"
    assert all(torch.equal(ck.weights[k], source.weights[k]) and ck.weights[k].dtype == source.weights[k].dtype
               for k in source.weights)


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process (Rss in /proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and not head[0].endswith(":"):
            ours = len(head) == 6 and Path(head[5]) == path
        elif ours and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc to see mappings")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loaded_and_upcast_checkpoints_keep_no_file_pages_resident_and_read_back_intact(tmp_path, suffix):
    # The NaN check reads every page and the upcast every bf16 one; at 0.4B that kept 1.1 GB of
    # the file in each process's RSS. Dropped, the tensors must still read the file's values.
    from parity.checkpoint import save_checkpoint

    source = load_checkpoint(FIXTURE_H2)
    path = save_checkpoint(source, tmp_path / f"model{suffix}").resolve()
    ck = load_checkpoint(path)
    assert _resident_bytes(path) == 0
    assert all(torch.equal(ck.weights[k], source.weights[k]) for k in source.weights)
    assert _resident_bytes(path) > 0, "reading the weights brings the pages back (else this test sees nothing)"
    shared = ck.fp32_weights()
    assert _resident_bytes(path) == 0
    assert all(torch.equal(shared[k].double(), source.weights[k].double()) for k in source.weights)
    assert all(torch.equal(ck.weights[k], source.weights[k]) for k in source.weights)  # read again, resident again
    assert ck.release_file_pages() > 0 and _resident_bytes(path) == 0


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc to see mappings")
def test_a_written_mapping_is_not_dropped(tmp_path):
    # A .pth is mapped copy-on-write: dropping a written page would silently restore the file's
    # bytes. Nothing may write into weights, but if something did, its write must survive.
    from parity.checkpoint import save_checkpoint

    source = load_checkpoint(FIXTURE_H2)
    path = save_checkpoint(source, tmp_path / "model.pth").resolve()
    ck = load_checkpoint(path)
    ck.weights["head.weight"][0, 0] = 1024.0  # exact in bf16
    assert ck.release_file_pages() == 0
    assert float(ck.weights["head.weight"][0, 0]) == 1024.0


def test_a_pre_zip_pth_still_loads(tmp_path):
    # torch < 1.6 wrote a non-zip format that cannot be memory-mapped: it is read whole instead.
    weights = torch.load(FIXTURE_HN, weights_only=True)
    path = tmp_path / "legacy.pth"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    ck = load_checkpoint(path)
    assert all(torch.equal(ck.weights[k], weights[k]) for k in weights)


def test_fp32_weights_are_exact_contiguous_aligned_and_made_once():
    ck = load_checkpoint(FIXTURE_H2)
    first, second = ck.fp32_weights(), ck.fp32_weights()
    assert first is not second, "each caller must get its own dict (the official package deletes keys in it)"
    assert first.keys() == ck.weights.keys()
    for key, stored in ck.weights.items():
        t = first[key]
        assert t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() % 64 == 0, key
        assert t.data_ptr() == second[key].data_ptr(), f"{key} was upcast twice"
        # bf16 and fp32 values are compared in float64, where both are exact.
        assert torch.equal(t.double(), stored.double()), key
    assert ck.fp32_nbytes() == sum(t.numel() for t in first.values()) * 4


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see mappings")
def test_fp32_tensors_in_the_file_are_used_in_place(tmp_path):
    from parity.checkpoint import save_checkpoint

    source = load_checkpoint(FIXTURE_H2)
    fp32 = dataclasses.replace(source, weights={k: v.float() for k, v in source.weights.items()})
    path = save_checkpoint(fp32, tmp_path / "fp32.pth")  # torch.save aligns each tensor to 64 bytes
    ck = load_checkpoint(path)
    shared = ck.fp32_weights()
    assert shared["head.weight"].data_ptr() == ck.weights["head.weight"].data_ptr()
    assert _mapped_from(shared["head.weight"], path.resolve())


def test_unaligned_fp32_safetensors_tensors_get_an_aligned_copy(tmp_path):
    from parity.checkpoint import save_checkpoint

    source = load_checkpoint(FIXTURE_H2)
    fp32 = dataclasses.replace(source, weights={k: v.float() for k, v in source.weights.items()})
    ck = load_checkpoint(save_checkpoint(fp32, tmp_path / "fp32.safetensors"))
    unaligned = [k for k, t in ck.weights.items() if t.data_ptr() % 64]
    assert unaligned, "expected safetensors data offsets that are not 64-byte aligned"
    shared = ck.fp32_weights()
    for k in ck.weights:
        assert shared[k].data_ptr() % 64 == 0 and torch.equal(shared[k], ck.weights[k]), k


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The path tests/compiled uses, so a build is compiled once per session.
    path = tmp_path_factory.getbasetemp() / "parity-compile-cache"
    path.mkdir(exist_ok=True)
    return path


def test_reference_compiled_and_official_read_one_fp32_copy(compile_cache):
    import numpy as np

    from parity.compiled.runtime import CompiledRWKV
    from parity.dumpers.official import load_official_model
    from parity.reference.rwkv5 import RWKV5Reference

    ck = load_checkpoint(FIXTURE_H2)
    shared = ck.fp32_weights()
    before = {k: t.clone() for k, t in shared.items()}
    ref = RWKV5Reference(ck)
    tvm_model = CompiledRWKV(ck, cache_dir=compile_cache)
    official = load_official_model(ck)
    key = "blocks.1.att.key.weight"
    assert ref.layers[1].Wk.data_ptr() == shared[key].data_ptr()
    assert ref.head_weight.data_ptr() == shared["head.weight"].data_ptr()
    param = tvm_model.params[tvm_model.artifact.meta["params"].index(key)]
    assert torch.from_dlpack(param).data_ptr() == shared[key].data_ptr()
    assert official.w[key].data_ptr() == shared[key].data_ptr()  # its transposed view of our tensor
    # One ln0-folded embedding table for the reference and the package (emb fp32, ln0 bf16 here).
    folded = ck.folded_embedding()
    folded_before = folded.clone()
    assert ref.emb.data_ptr() == folded.data_ptr() == official.w["emb.weight"].data_ptr()
    # Nobody writes into the shared tensors: run all three, then compare with the snapshot.
    ids = [1, 2, 3, 4]
    ref.forward(ids)
    tvm_model.forward(ids)
    tvm_model.forward([5], tvm_model.forward(ids).state)
    official.forward(ids, None, full_output=True)
    assert all(torch.equal(shared[k], before[k]) for k in shared)
    assert torch.equal(folded, folded_before)
    assert np.isfinite(tvm_model.forward(ids).logits).all()


def test_the_package_folds_its_own_table_where_its_fold_is_not_ours():
    from parity.dumpers.official import load_official_model

    # emb and ln0 both stored in bf16: the package folds in bf16, not in fp32 as folded_embedding does.
    ck = load_checkpoint(FIXTURE_H2)
    bf16 = dataclasses.replace(ck, weights={**ck.weights, "emb.weight": ck.weights["emb.weight"].to(torch.bfloat16)})
    official = load_official_model(bf16)
    own = official.w["emb.weight"]
    assert own.data_ptr() != bf16.folded_embedding().data_ptr()
    w = bf16.weights
    expected = torch.nn.functional.layer_norm(w["emb.weight"], (bf16.config.n_embd,), w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
    assert torch.equal(own, expected.float())


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pth")), ids=lambda p: p.stem)
def test_official_model_on_shared_weights_is_bit_identical_to_reading_the_file(path):
    from parity.dumpers.official import load_official_model

    ck = load_checkpoint(path)
    own, shared = load_official_model(path), load_official_model(ck)
    state_own = state_shared = None
    for ids in ([3, 1, 4, 1, 5], [9], [2]):  # a prefill, then two decode steps
        out_own, state_own = own.forward(ids, state_own, full_output=True)
        out_shared, state_shared = shared.forward(ids, state_shared, full_output=True)
        assert torch.equal(out_own, out_shared)
        assert len(state_own) == len(state_shared) and all(torch.equal(a, b) for a, b in zip(state_own, state_shared))


def test_compiled_model_on_shared_weights_is_bit_identical_to_private_copies(compile_cache):
    import numpy as np
    import tvm

    from parity.compiled.runtime import CompiledRWKV

    ck = load_checkpoint(FIXTURE_HN)
    shared = CompiledRWKV(ck, cache_dir=compile_cache)
    private = CompiledRWKV(ck, artifact=shared.artifact)
    # What the runtime did before sharing: its own upcast copy of every param.
    private.params = [tvm.runtime.tensor(np.ascontiguousarray(ck.weights[n].float().numpy()), private.device)
                      for n in private.artifact.meta["params"]]
    a, b = shared.forward([7, 3, 5]), private.forward([7, 3, 5])
    assert np.array_equal(a.logits, b.logits)
    a, b = shared.forward([11], a.state), private.forward([11], b.state)
    assert np.array_equal(a.logits, b.logits)
    assert all(np.array_equal(x, y) for x, y in zip(a.state.to_numpy().values(), b.state.to_numpy().values()))


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pth")), ids=lambda p: p.stem)
def test_reference_on_shared_weights_is_bit_identical_to_private_copies(path):
    from parity.reference import make_reference

    ck = load_checkpoint(path)
    private_ck = dataclasses.replace(ck, weights={k: v.float().clone() for k, v in ck.weights.items()})
    shared, private = make_reference(ck), make_reference(private_ck)
    assert shared.head_weight.data_ptr() != private.head_weight.data_ptr()
    stages_a, stages_b = [], []
    a = shared.forward([3, 1, 4], record=lambda name, v: stages_a.append((name, v.clone())))
    b = private.forward([3, 1, 4], record=lambda name, v: stages_b.append((name, v.clone())))
    assert torch.equal(a[0], b[0]) and len(stages_a) == len(stages_b) > 10
    assert all(na == nb and torch.equal(va, vb) for (na, va), (nb, vb) in zip(stages_a, stages_b))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_a_non_fp32_reference_leaves_no_fp32_copy_behind(dtype):
    # Its upcast is temporary (as before sharing): caching an fp32 copy for a bf16 run would cost
    # a whole fp32 model for as long as the checkpoint lives.
    from parity.reference import make_reference

    ck = load_checkpoint(FIXTURE_H2)
    make_reference(ck, dtype=dtype).forward([1, 2])
    assert ck._fp32 is None
    make_reference(ck).forward([1, 2])
    assert ck._fp32 is not None


# -- non-finite weights: refused at load, naming the tensor and the count ---------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_named_with_its_count(tmp_path, bad):
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights["blocks.1.att.key.weight"][3, :5] = bad  # 5 of 16*16 values
    msg = load_error(save(weights, tmp_path / "bad.pth"))
    assert "NaN/Inf" in msg and "blocks.1.att.key.weight (5 of 256)" in msg, msg
    assert "blocks.0." not in msg, msg  # only the damaged tensor is named


def test_non_finite_weights_in_bf16_safetensors_are_named(tmp_path):
    from safetensors.torch import save_file

    weights = {k: v.to(torch.bfloat16) for k, v in state_dict_for(tiny_config(ModelVersion.V4)).items()}
    weights["head.weight"][0, 0] = float("nan")
    weights["emb.weight"][1, :2] = float("inf")
    save_file(weights, str(tmp_path / "bad.safetensors"))
    msg = load_error(tmp_path / "bad.safetensors")
    assert "emb.weight (2 of 512)" in msg and "head.weight (1 of 512)" in msg, msg


def test_finite_check_counts_across_chunks(tmp_path, monkeypatch):
    # A tensor larger than one chunk: values in several chunks are all counted.
    import parity.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_FINITE_CHUNK", 7)
    weights = state_dict_for(tiny_config(ModelVersion.V5_2))
    weights["emb.weight"].view(-1)[[0, 6, 7, 100, 511]] = float("nan")
    assert "emb.weight (5 of 512)" in load_error(save(weights, tmp_path / "bad.pth"))


def test_cli_names_the_non_finite_weight_in_one_line(tmp_path):
    weights = torch.load(FIXTURE_HN, weights_only=True)
    weights["blocks.1.ffn.value.weight"][0, 0] = float("nan")
    save(weights, tmp_path / "nan.pth")
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--checkpoint", str(tmp_path / "nan.pth"), "-q"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "blocks.1.ffn.value.weight (1 of" in lines[0], proc.stderr


# -- MappedCheckpoint: the weights a torch-free TVM worker reads with numpy (parity/dumpers/worker.py)
def _mapped(ck):
    from parity.checkpoint import file_locations, open_mapped

    locations = file_locations(ck)
    assert locations is not None, "the loaded tensors are views of the file: their places are sure"
    return open_mapped(path=ck.path, sha256=ck.sha256, config=ck.config, locations=locations)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc to see mappings")
@pytest.mark.parametrize("suffix,dtypes", [
    (".pth", None),  # the fixture as stored: bf16 with fp32 tensors among them
    (".safetensors", None),  # safetensors' data starts 8-byte aligned: some fp32 need a copy
    (".pth", torch.float16),
    (".safetensors", torch.float32),
])
def test_a_mapped_checkpoint_has_the_fp32_weights_bit_for_bit(tmp_path, suffix, dtypes):
    import numpy as np

    from parity.checkpoint import save_checkpoint

    source = load_checkpoint(FIXTURE_H2)
    if dtypes is not None:
        source = dataclasses.replace(source, weights={k: v.to(dtypes) for k, v in source.weights.items()})
    ck = load_checkpoint(save_checkpoint(source, tmp_path / f"model{suffix}"))
    mapped = _mapped(ck)
    want, got = ck.fp32_weights(), mapped.fp32_weights()
    assert got.keys() == want.keys() and mapped.fp32_nbytes() == ck.fp32_nbytes()
    for key in want:
        a, b = want[key].numpy(), got[key]
        assert b.dtype == np.float32 and b.shape == a.shape and b.flags.c_contiguous and b.ctypes.data % 64 == 0, key
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), key  # bits, so -0.0 and NaN payloads count
        assert got[key] is mapped.fp32_weights()[key], f"{key} was converted twice"
    in_place = [k for k, t in ck.weights.items() if t.dtype == torch.float32 and t.data_ptr() % 64 == 0]
    for key in in_place:  # fp32 at an aligned offset: the file's bytes, no copy (as fp32_weights)
        assert not got[key].flags.owndata and got[key].base is not None, key


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc to see mappings")
def test_file_locations_say_none_when_any_tensor_is_not_a_view_of_the_file(tmp_path):
    from parity.checkpoint import file_locations

    ck = load_checkpoint(FIXTURE_H2)
    assert file_locations(ck) is not None
    changed = dict(ck.weights, **{"head.weight": ck.weights["head.weight"].clone()})  # in memory, not the file's
    assert file_locations(dataclasses.replace(ck, weights=changed)) is None
    strided = dict(ck.weights, **{"head.weight": ck.weights["head.weight"].t()})  # a view of the file, transposed
    assert file_locations(dataclasses.replace(ck, weights=strided)) is None
    assert file_locations(dataclasses.replace(ck, path=tmp_path / "gone.pth")) is None
    written = load_checkpoint(FIXTURE_H2)
    written.weights["ln_out.weight"][0] = 2.0  # a copy-on-write page: the file no longer says what memory holds
    assert file_locations(written) is None


def test_the_checkpoint_module_imports_without_torch():
    # The torch-free worker imports it (ModelConfig, open_mapped) with torch blocked.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import parity.checkpoint, parity.compiled.runtime, parity.dumpers.registry\n"
            "assert sys.modules['torch'] is None")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_ln0_folded_a_block_of_rows_at_a_time_is_the_whole_table_call_bit_for_bit(monkeypatch):
    import parity.checkpoint as checkpoint_module
    from parity.checkpoint import LN0_EPS, fold_ln0

    monkeypatch.setattr(checkpoint_module, "_RELEASE_EVERY", 1 << 20)  # 341 rows of 768 fp32 a block
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5000, 768, generator=g) * 3 + 0.5
    weight, bias = torch.randn(768, generator=g), torch.randn(768, generator=g)
    released = []
    folded = fold_ln0(emb, weight, bias, release=lambda: released.append(1))
    whole = torch.nn.functional.layer_norm(emb, (768,), weight, bias, LN0_EPS)
    assert torch.equal(folded.view(torch.int32), whole.view(torch.int32))  # bits
    assert len(released) == -(-5000 // 341)
