"""``parity convert`` and the checkpoint formats it moves between: .pth, .safetensors, HF directories.

Also the loader's refusals that conversion leans on: HF directories that contradict themselves,
and checkpoints of versions (6, 7) or layouts this release does not run.

The CLI runs in subprocesses (each pays ~1.5 s of torch start-up), in two waves as wide as the
machine: first the conversions from the v4 fixture and the refusals, then the conversions back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parity.checkpoint import (
    Checkpoint,
    ModelVersion,
    detect_version,
    expected_shapes,
    load_checkpoint,
    save_checkpoint,
)
from parity.errors import ParityError
from parity.hf_names import chatrwkv_to_hf
from parity.synthetic import make_config, make_weights
from parity_cli import REPO, Cli, cli_env, run_concurrently

FIXTURES = REPO / "fixtures"
FIXTURE_FILES = sorted(FIXTURES.glob("*.pth"))
FIXTURE_V4 = FIXTURES / "rwkv4-L2-C64.pth"
FIXTURE_V5_1 = FIXTURES / "rwkv5_1-L2-C64-H8.pth"


def assert_same_checkpoint(got: Checkpoint, want: Checkpoint) -> None:
    assert got.config == want.config
    assert got.weights.keys() == want.weights.keys()
    for key, value in want.weights.items():
        # torch.equal alone would pass a bf16 tensor upcast to fp32; a round trip keeps the dtype.
        assert got.weights[key].dtype == value.dtype, key
        assert torch.equal(got.weights[key], value), key


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    env = cli_env()
    tmp = tmp_path_factory.mktemp("convert")
    (tmp / "occupied").mkdir()
    (tmp / "occupied" / "notes.txt").write_text("keep me")
    (tmp / "taken.pth").write_text("hello")
    first = {
        "v4 -> safetensors": ["convert", FIXTURE_V4, tmp / "v4.safetensors"],
        "v4 -> hf": ["convert", FIXTURE_V4, tmp / "hf-v4"],
        "5.1 -> hf": ["convert", FIXTURE_V5_1, tmp / "hf-v5_1"],
        "v4 -> non-empty dir": ["convert", FIXTURE_V4, tmp / "occupied"],
        "v4 -> non-empty dir --force": ["convert", FIXTURE_V4, tmp / "occupied", "--force"],
        "v4 -> existing file": ["convert", FIXTURE_V4, tmp / "taken.pth"],
        "v4 -> unknown suffix": ["convert", FIXTURE_V4, tmp / "out.bin"],
    }
    results = run_concurrently(first, env=env)
    second = {
        "safetensors -> pth": ["convert", tmp / "v4.safetensors", tmp / "v4.pth"],
        "hf -> pth": ["convert", tmp / "hf-v4", tmp / "from-hf.pth"],
    }
    results |= run_concurrently(second, env=env)
    third = {  # after the second wave has read hf-v4
        "v4 -> existing file --force": ["convert", FIXTURE_V4, tmp / "taken.pth", "--force"],
        "v4 -> hf again --force": ["convert", FIXTURE_V4, tmp / "hf-v4", "--force"],
    }
    results |= run_concurrently(third, env=env)
    return {"tmp": tmp, "results": results}


def error_line(cli: Cli) -> str:
    """The one line a refused conversion prints; asserts it is exactly one and no traceback."""
    assert cli.rc == 2, cli
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parity: error: "), cli
    return lines[0]


# -- round trips through the CLI ----------------------------------------------------------------


def test_pth_to_safetensors_to_pth_is_bit_exact(converted) -> None:
    for name in ("v4 -> safetensors", "safetensors -> pth"):
        cli = converted["results"][name]
        assert cli.rc == 0, cli
        assert "bit-exact round trip" in cli.stdout, cli
    tmp = converted["tmp"]
    original = load_checkpoint(FIXTURE_V4)
    assert_same_checkpoint(load_checkpoint(tmp / "v4.safetensors"), original)
    assert_same_checkpoint(load_checkpoint(tmp / "v4.pth"), original)


@pytest.mark.parametrize("path", [p for p in FIXTURE_FILES if p != FIXTURE_V4], ids=lambda p: p.stem)
def test_every_version_round_trips_through_safetensors(tmp_path, capsys, path: Path) -> None:
    # The same command in-process (a subprocess per fixture would cost ~1.5 s of start-up each):
    # every version's key set and its mix of bf16 and fp32 tensors.
    from parity.cli import main

    assert main(["convert", str(path), str(tmp_path / "x.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "x.safetensors"), str(tmp_path / "y.pth")]) == 0
    assert capsys.readouterr().out.count("bit-exact round trip") == 2
    original = load_checkpoint(path)
    assert_same_checkpoint(load_checkpoint(tmp_path / "x.safetensors"), original)
    assert_same_checkpoint(load_checkpoint(tmp_path / "y.pth"), original)


def test_v4_to_hf_directory_to_pth_is_bit_exact(converted) -> None:
    for name in ("v4 -> hf", "hf -> pth"):
        assert converted["results"][name].rc == 0, converted["results"][name]
    tmp = converted["tmp"]
    hf = tmp / "hf-v4"
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((hf / "config.json").read_text())["model_type"] == "rwkv"
    original = load_checkpoint(FIXTURE_V4)
    assert_same_checkpoint(load_checkpoint(hf), original)
    assert_same_checkpoint(load_checkpoint(tmp / "from-hf.pth"), original)


def test_rwkv5_to_hf_directory_is_refused(converted) -> None:
    line = error_line(converted["results"]["5.1 -> hf"])
    assert "RWKV-4 only" in line and "RWKV-5.1" in line
    assert not (converted["tmp"] / "hf-v5_1").exists()  # refused before anything was written


def test_conversion_onto_a_non_empty_directory_is_refused(converted) -> None:
    line = error_line(converted["results"]["v4 -> non-empty dir"])
    assert "occupied exists (a directory); pass --force" in line
    # --force replaces a checkpoint directory, never a directory of other files.
    line = error_line(converted["results"]["v4 -> non-empty dir --force"])
    assert "notes.txt" in line and "choose a new directory" in line
    occupied = converted["tmp"] / "occupied"
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_conversion_onto_an_existing_file_is_refused_unless_forced(converted) -> None:
    line = error_line(converted["results"]["v4 -> existing file"])
    assert "taken.pth exists (a file); pass --force" in line
    forced = converted["results"]["v4 -> existing file --force"]
    assert forced.rc == 0, forced
    # The refusal left "hello" in place until --force, which wrote a real checkpoint there.
    assert_same_checkpoint(load_checkpoint(converted["tmp"] / "taken.pth"), load_checkpoint(FIXTURE_V4))


def test_unknown_output_suffix_is_an_error_not_a_directory(converted) -> None:
    line = error_line(converted["results"]["v4 -> unknown suffix"])
    assert "'.bin'" in line and ".pth or .safetensors" in line
    assert not (converted["tmp"] / "out.bin").exists()


def test_forced_conversion_replaces_an_hf_directory(converted) -> None:
    forced = converted["results"]["v4 -> hf again --force"]
    assert forced.rc == 0, forced
    hf = converted["tmp"] / "hf-v4"
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_checkpoint(load_checkpoint(hf), load_checkpoint(FIXTURE_V4))


def test_conversion_onto_an_existing_file_without_a_checkpoint_suffix_is_refused(tmp_path) -> None:
    dest = tmp_path / "model"
    dest.write_text("not a directory")
    with pytest.raises(ParityError, match="model"):
        save_checkpoint(load_checkpoint(FIXTURE_V4), dest)
    assert dest.read_text() == "not a directory"


# -- HF directories -----------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A valid HF directory of the v4 fixture, for the tests below to damage."""
    return save_checkpoint(load_checkpoint(FIXTURE_V4), tmp_path / "hf")


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def load_error(path: Path) -> str:
    with pytest.raises(ParityError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.isprintable(), f"not one plain line: {msg!r}"
    return msg


@pytest.mark.parametrize(("field", "actual"), [("hidden_size", 64), ("num_hidden_layers", 2), ("vocab_size", 512)])
def test_hf_config_that_disagrees_with_the_weights(hf_dir: Path, field: str, actual: int) -> None:
    edit_config(hf_dir, **{field: actual + 1})
    msg = load_error(hf_dir)
    assert field in msg and f"{actual + 1}" in msg and f"weights have {actual}" in msg


@pytest.mark.parametrize("model_type", ["rwkv5", "gpt2", None], ids=["rwkv5", "gpt2", "absent"])
def test_hf_config_of_another_model_type(hf_dir: Path, model_type: str | None) -> None:
    edit_config(hf_dir, model_type=model_type)
    msg = load_error(hf_dir)
    assert "model_type" in msg and "config.json" in msg


def test_hf_directory_without_weights(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").unlink()
    msg = load_error(hf_dir)
    assert "model.safetensors" in msg and "pytorch_model.bin" in msg


def test_hf_config_that_is_not_json(hf_dir: Path) -> None:
    (hf_dir / "config.json").write_text("{not json")
    assert "config.json" in load_error(hf_dir)


def test_hf_directory_with_pytorch_model_bin(hf_dir: Path) -> None:
    # Older HF checkpoints (e.g. the RWKV-4 Pile models on the Hub) ship a pickled pytorch_model.bin.
    original = load_checkpoint(FIXTURE_V4)
    (hf_dir / "model.safetensors").unlink()
    torch.save({chatrwkv_to_hf(k): v for k, v in original.weights.items()}, hf_dir / "pytorch_model.bin")
    assert_same_checkpoint(load_checkpoint(hf_dir), original)


def test_directory_written_by_transformers_save_pretrained(tmp_path) -> None:
    from transformers import RwkvConfig, RwkvForCausalLM

    from parity.hf_names import hf_config

    original = load_checkpoint(FIXTURE_V4)
    kwargs = {k: v for k, v in hf_config(original.config).items() if k not in ("architectures", "model_type")}
    model = RwkvForCausalLM(RwkvConfig(**kwargs))
    model.load_state_dict({chatrwkv_to_hf(k): v.float() for k, v in original.weights.items()}, strict=True)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # HF's own layout, not ours
    loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.config == original.config
    assert loaded.weights.keys() == original.weights.keys()
    for key, value in original.weights.items():
        # HF built an fp32 model; bf16 -> fp32 is exact, so the values are still the fixture's.
        assert torch.equal(loaded.weights[key], value.float()), key


# -- versions and layouts this release does not run ---------------------------------------------


def tiny_weights(version: str, *, n_layer: int = 2) -> dict[str, torch.Tensor]:
    head_size = None if version == "4" else 8
    cfg = make_config(n_layer=n_layer, n_embd=16, head_size=head_size, vocab_size=32, version=version)
    return make_weights(cfg, seed=0)


def rwkv6_weights() -> dict[str, torch.Tensor]:
    """v5.2 plus the data-dependent token-shift (time_maa*) and decay LoRA keys of RWKV-6."""
    w = tiny_weights("5.2")
    for layer in range(2):
        b = f"blocks.{layer}.att."
        for mix in ("k", "v", "r", "g"):
            del w[f"{b}time_mix_{mix}"]
        for name in ("x", "w", "k", "v", "r", "g"):
            w[f"{b}time_maa_{name}"] = torch.zeros(1, 1, 16)
        w[f"{b}time_maa_w1"], w[f"{b}time_maa_w2"] = torch.zeros(16, 160), torch.zeros(5, 32, 16)
        w[f"{b}time_decay_w1"], w[f"{b}time_decay_w2"] = torch.zeros(16, 64), torch.zeros(64, 16)
    return w


def rwkv7_weights() -> dict[str, torch.Tensor]:
    """The x070 layout the official package loads: x_* mixes, w0/a0/v0 LoRAs, k_k, no ffn.receptance."""
    C, D = 16, 8
    w = {k: v for k, v in tiny_weights("5.2").items() if ".time_" not in k and "ffn.receptance" not in k}
    for layer in range(2):
        b = f"blocks.{layer}."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            w[f"{b}att.{name}"] = torch.zeros(1, 1, C)
        for name in ("w", "a", "g") + (("v",) if layer else ()):
            w[f"{b}att.{name}1"], w[f"{b}att.{name}2"] = torch.zeros(C, D), torch.zeros(D, C)
        w[f"{b}att.r_k"] = torch.zeros(2, 8)
        w[f"{b}ffn.x_k"] = torch.zeros(1, 1, C)
    return w


@pytest.mark.parametrize("make", [rwkv6_weights, rwkv7_weights], ids=["rwkv6", "rwkv7"])
def test_later_versions_are_refused_by_detection(make) -> None:
    with pytest.raises(ParityError, match=r"RWKV-6 or later .* only RWKV-4 and RWKV-5 are in scope"):
        detect_version(make())


@pytest.mark.parametrize("make", [rwkv6_weights, rwkv7_weights], ids=["rwkv6", "rwkv7"])
def test_later_versions_are_refused_on_load_before_any_shape_check(tmp_path, make) -> None:
    # The version is the real problem; "missing key blocks.0.att.time_decay" would mislead.
    torch.save(make(), tmp_path / "later.pth")
    msg = load_error(tmp_path / "later.pth")
    assert "RWKV-6 or later" in msg and "missing key" not in msg


def test_state_dict_without_rwkv_keys(tmp_path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)}, tmp_path / "x.pth")
    msg = load_error(tmp_path / "x.pth")
    assert "missing key 'emb.weight'" in msg and "RWKV" in msg


def test_hf_named_tensors_in_a_single_file_are_not_mistaken_for_chatrwkv(tmp_path) -> None:
    weights = {chatrwkv_to_hf(k): v for k, v in load_checkpoint(FIXTURE_V4).weights.items()}
    torch.save(weights, tmp_path / "hf-names.pth")
    assert "missing key 'emb.weight'" in load_error(tmp_path / "hf-names.pth")


@pytest.mark.parametrize(
    ("version", "key", "shape", "expected"),
    [
        # Layer 1 built for another width: C = 24 instead of 16.
        ("4", "blocks.1.att.key.weight", (16, 24), (16, 16)),
        ("4", "blocks.1.att.time_first", (17,), (16,)),
        # Layer 1 with another head count than layer 0 (H read from layer 0: 2 heads of 8).
        ("5.0", "blocks.1.att.time_decay", (4,), (2,)),
        ("5.1", "blocks.1.att.gate.weight", (32, 16), (16, 16)),
        ("5.2", "blocks.1.att.time_faaaa", (4, 4), (2, 8)),
        # A different FFN width in layer 1.
        ("5.2", "blocks.1.ffn.value.weight", (16, 64), (16, 32)),
    ],
)
def test_layers_of_mismatched_shapes(tmp_path, version: str, key: str, shape, expected) -> None:
    weights = tiny_weights(version)
    # The undamaged dict loads, and the loader expects exactly the shape layer 0 implies.
    torch.save(weights, tmp_path / "good.pth")
    assert expected_shapes(load_checkpoint(tmp_path / "good.pth").config)[key] == expected
    weights[key] = torch.zeros(shape)
    torch.save(weights, tmp_path / "bad.pth")
    msg = load_error(tmp_path / "bad.pth")
    assert key in msg and f"shape {shape}" in msg and f"expected {expected}" in msg


def test_tiny_weights_are_the_versions_they_claim() -> None:
    # Guards the helpers above: a mislabeled dict would make the shape tests vacuous.
    for version in ("4", "5.0", "5.1", "5.2"):
        assert detect_version(tiny_weights(version)) == ModelVersion(version)
