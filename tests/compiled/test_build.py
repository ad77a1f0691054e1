"""The compile cache: a warm build compiles nothing, and anything that changes the binary changes the key."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from parity.checkpoint import ModelConfig, expected_shapes
from parity.compiled import build, wkv5_kernel
from parity.compiled.build import BuildArtifact, build_model, cache_key, default_cache_dir
from parity.errors import ParityError
from parity.synthetic import make_config

# Small enough to compile in about a second; two heads so the wkv kernel runs its head loop.
TINY = make_config(n_layer=1, n_embd=32, head_size=16, vocab_size=64)


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildArtifact]:
    """A cache dir holding one cold build of TINY (plain), and that build's artifact."""
    cache_dir = tmp_path_factory.mktemp("build-cache")
    return cache_dir, build_model(TINY, cache_dir=cache_dir)


class CompileCalled(Exception):
    pass


def forbid_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any compile raise, so a test can tell a hit (no compile) from a miss."""

    def fail(*args, **kwargs):
        raise CompileCalled

    monkeypatch.setattr(build.tvm, "compile", fail)


def test_cold_build_writes_library_and_sidecar(warm) -> None:
    cache_dir, art = warm
    assert art.cached is False
    assert art.library.parent == cache_dir and art.library.is_file() and art.library.suffix == ".so"
    meta = json.loads(art.library.with_suffix(".json").read_text())
    assert meta == art.meta
    assert meta["config"] == TINY.to_dict() and meta["variant"] == "plain" and meta["target"] == "llvm"
    # The params a runner binds are exactly the checkpoint keys: one weight file feeds every backend.
    assert sorted(meta["params"]) == sorted(expected_shapes(TINY))
    assert meta["state_slots"] == ["state.L0.att_x", "state.L0.att_kv", "state.L0.ffn_x"]
    assert meta["tap_names"] == []  # only the debug build returns taps
    assert not list(cache_dir.glob("*.tmp"))  # the export went through a temp name


def test_second_build_is_a_cache_hit_without_compiling(warm, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir, cold = warm
    mtime = cold.library.stat().st_mtime_ns
    forbid_compiling(monkeypatch)
    events: list[str] = []
    hit = build_model(TINY, cache_dir=cache_dir, on_event=events.append)
    assert hit.cached is True
    assert hit.library == cold.library and hit.meta == cold.meta
    assert cold.library.stat().st_mtime_ns == mtime
    assert any("cache hit" in e for e in events)


def test_key_is_deterministic_and_covers_config_variant_and_target() -> None:
    base = cache_key(config=TINY, variant="plain", target="llvm")
    assert cache_key(config=TINY, variant="plain", target="llvm") == base
    other_config = dataclasses.replace(TINY, vocab_size=TINY.vocab_size * 2)
    keys = {
        base,
        cache_key(config=TINY, variant="debug", target="llvm"),
        cache_key(config=TINY, variant="plain", target="cuda"),
        cache_key(config=other_config, variant="plain", target="llvm"),
        cache_key(config=dataclasses.replace(TINY, n_layer=2), variant="plain", target="llvm"),
    }
    assert len(keys) == 5


def test_other_variant_and_config_are_separate_entries(warm, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir, plain = warm
    debug = build_model(TINY, variant="debug", cache_dir=cache_dir)
    assert debug.cached is False and debug.library != plain.library
    assert debug.meta["tap_names"][0] == "emb" and "L0.att.wkv" in debug.meta["tap_names"]
    # Neither build evicted the other: both are hits now.
    forbid_compiling(monkeypatch)
    assert build_model(TINY, cache_dir=cache_dir).cached
    assert build_model(TINY, variant="debug", cache_dir=cache_dir).cached


def _edited_read_text(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    real = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        text = real(self, *args, **kwargs)
        return text + "\n# edited\n" if self == Path(source) else text

    monkeypatch.setattr(Path, "read_text", read_text)


# Every file of the compiled package shapes the binary (kernels, model families, shared pieces,
# the pipeline in build.py) except the runners and the package marker. Listing the directory
# rather than naming files catches a new kernel file that nobody added to the key. cuda.py loads
# builds and runs nvcc; its fatbins have their own key (the CUDA source and the arch). host.py says
# where the cache is and which CPU this is; the CPU's name is in the key itself (target_spec's mcpu).
COMPILED_DIR = Path(build.__file__).parent
SOURCES = sorted(p.name for p in COMPILED_DIR.glob("*.py")
                 if p.name not in ("__init__.py", "runtime.py", "cuda.py", "host.py"))


def test_the_sources_include_the_kernel_model_and_pipeline() -> None:
    assert {"wkv5_kernel.py", "rwkv5_model.py", "build.py"} <= set(SOURCES)


@pytest.mark.parametrize("source", SOURCES)
def test_key_changes_when_source_text_changes(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_key(config=TINY, variant="plain", target="llvm")
    _edited_read_text(monkeypatch, str(COMPILED_DIR / source))
    assert cache_key(config=TINY, variant="plain", target="llvm") != before


def test_edited_kernel_source_is_a_miss(warm, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir, cold = warm
    _edited_read_text(monkeypatch, wkv5_kernel.__file__)
    # Stop at the compile call: reaching it proves the miss, and compiling would only cost time.
    forbid_compiling(monkeypatch)
    with pytest.raises(CompileCalled):
        build_model(TINY, cache_dir=cache_dir)
    assert cold.library.is_file()  # the stale entry is left alone, merely no longer found


def copy_entry(art: BuildArtifact, *, to: Path, sidecar: str) -> Path:
    """Put ``art``'s library into cache dir ``to`` beside a sidecar with the given text."""
    library = to / art.library.name
    shutil.copyfile(art.library, library)
    library.with_suffix(".json").write_text(sidecar)
    return library


def test_damaged_sidecar_is_a_miss_and_is_rewritten(warm, tmp_path: Path) -> None:
    _, cold = warm
    # A build killed while writing the sidecar leaves it truncated.
    library = copy_entry(cold, to=tmp_path, sidecar=json.dumps(cold.meta)[:40])
    again = build_model(TINY, cache_dir=tmp_path)
    assert again.cached is False and again.library == library
    assert json.loads(library.with_suffix(".json").read_text()) == again.meta
    assert again.meta["params"] == cold.meta["params"]


def test_sidecar_without_library_is_a_miss(warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cold = warm
    (tmp_path / cold.library.with_suffix(".json").name).write_text(json.dumps(cold.meta))
    forbid_compiling(monkeypatch)
    with pytest.raises(CompileCalled):
        build_model(TINY, cache_dir=tmp_path)


@pytest.mark.parametrize("sidecar", ["{}", "[]", '{"params": []}'])
def test_sidecar_without_fields_is_a_miss(warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sidecar: str) -> None:
    _, cold = warm
    copy_entry(cold, to=tmp_path, sidecar=sidecar)
    forbid_compiling(monkeypatch)
    with pytest.raises(CompileCalled):
        build_model(TINY, cache_dir=tmp_path)


def test_unknown_variant_is_a_parity_error(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="variant"):
        build_model(TINY, variant="fast", cache_dir=tmp_path)


def test_unknown_target_is_a_parity_error(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="target"):
        build_model(TINY, target="rocm", cache_dir=tmp_path)


def test_unknown_target_name_in_make_target_is_a_parity_error() -> None:
    with pytest.raises(ParityError, match="rocm"):
        build.make_target("rocm")


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARITY_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("PARITY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rwkv-parity"


def test_config_round_trips_through_the_sidecar(warm) -> None:
    _, art = warm
    assert ModelConfig.from_dict(art.meta["config"]) == TINY


def test_truncated_library_is_detected_and_rebuilt(warm, tmp_path: Path) -> None:
    _, cold = warm
    library = copy_entry(cold, to=tmp_path, sidecar=json.dumps(cold.meta))
    size = library.stat().st_size
    with library.open("r+b") as f:  # a copy cut short / a full disk during a copy
        f.truncate(size // 2)
    events: list[str] = []
    again = build_model(TINY, cache_dir=tmp_path, on_event=events.append)
    assert again.cached is False and again.library == library
    assert any("unusable" in e and "truncated" in e for e in events), events
    assert library.stat().st_size == again.meta["library_bytes"] > size // 2
    assert build_model(TINY, cache_dir=tmp_path).cached  # the rebuilt entry is a hit again


def test_modified_library_of_the_same_size_is_a_miss(warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cold = warm
    library = copy_entry(cold, to=tmp_path, sidecar=json.dumps(cold.meta))
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    forbid_compiling(monkeypatch)
    with pytest.raises(CompileCalled):
        build_model(TINY, cache_dir=tmp_path)


def test_entry_from_another_tvm_version_is_a_miss(warm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cold = warm
    copy_entry(cold, to=tmp_path, sidecar=json.dumps({**cold.meta, "tvm_version": "0.0.1-other"}))
    forbid_compiling(monkeypatch)
    with pytest.raises(CompileCalled):
        build_model(TINY, cache_dir=tmp_path)
