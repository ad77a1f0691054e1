"""``parity run --corpus``: one comparison per prompt, KL and top-1 pooled over every token row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity.cli import main
from parity.corpus import aggregate, corpus_entries
from parity.errors import ParityError

REPO = Path(__file__).resolve().parents[1]
L4 = str(REPO / "fixtures" / "rwkv5_2-L4-C128-H2.pth")


def test_entries_skip_blank_and_comment_lines(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\n\n# not a prompt\n  two  \n", encoding="utf-8")
    assert corpus_entries(f) == [("line 1", {"text": "one"}), ("line 4", {"text": "  two  "})]


def test_a_directory_is_its_scenarios(tmp_path):
    names = [name for name, _ in corpus_entries(REPO / "fixtures" / "scenarios")]
    assert names == sorted(p.stem for p in (REPO / "fixtures" / "scenarios").glob("*.json"))


@pytest.mark.parametrize("content", ["", "\n# only a comment\n"])
def test_an_empty_corpus_is_an_input_error(tmp_path, content):
    f = tmp_path / "c.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ParityError, match="no prompts"):
        corpus_entries(f)


def test_aggregate_pools_rows_not_prompt_averages():
    prompts = [
        {"verdict": "no divergence", "end_to_end": {"rows": 1, "top1_agreement": 1.0, "top1_ties": 0, "kl_rows": [0.5]}},
        {"verdict": "divergence", "end_to_end": {"rows": 3, "top1_agreement": 2 / 3, "top1_ties": 1, "kl_rows": [0.0, 0.1, 0.2]}},
    ]
    agg = aggregate(prompts)
    assert agg["rows"] == 4 and agg["diverged"] == 1
    assert agg["kl_mean"] == pytest.approx(0.2)  # (0.5 + 0 + 0.1 + 0.2) / 4, not (0.5 + 0.1) / 2
    assert agg["kl_max"] == 0.5 and agg["top1_agreement"] == pytest.approx(3 / 4) and agg["top1_ties"] == 1


def test_corpus_run_end_to_end(tmp_path, capsys, compile_cache):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("Hello there\nWhat is an RNN?\n", encoding="utf-8")
    out = tmp_path / "corpus.json"
    code = main(["run", "--checkpoint", L4, "--corpus", str(corpus), "--decode-steps", "2", "--json", str(out),
                 "--cache-dir", str(compile_cache), "-q"])
    assert code == 0
    data = json.loads(out.read_text())
    assert [p["name"] for p in data["prompts"]] == ["line 1", "line 2"]
    per = [r["end_to_end"] for r in data["results"]]
    assert data["corpus"]["rows"] == sum(e["rows"] for e in per)
    assert data["corpus"]["kl_max"] == max(e["kl_max"] for e in per)
    assert "corpus: no divergence (2 prompts" in capsys.readouterr().out


def test_corpus_with_a_bug_exits_1_and_counts_prompts(tmp_path, capsys, compile_cache):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("Hello there\nWhat is an RNN?\n", encoding="utf-8")
    code = main(["run", "--checkpoint", L4, "--backends", "reference,mutant/groupnorm-eps-1e-5", "--corpus", str(corpus),
                 "--decode-steps", "1", "--cache-dir", str(compile_cache), "-q"])
    assert code == 1
    assert "corpus: DIVERGENCE in 2 of 2 prompts" in capsys.readouterr().out


def test_corpus_refuses_a_second_prompt_source(tmp_path, capsys):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("Hello\n", encoding="utf-8")
    assert main(["run", "--checkpoint", L4, "--corpus", str(corpus), "--ids", "1,2"]) == 2
    assert "--corpus gives the prompts" in capsys.readouterr().err
