"""The project's BPE tokenizer, trained for real on stdlib code (issue 3 §1 and §5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shards_helpers import STDLIB, make_params, stdlib_docs, unicode_tabs_doc, write_corpus

from pipeline.cli import main as ownllm
from pipeline.tokenizer import EOS, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, load_fast, special_tokens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root, stdlib_docs())
    params = make_params(root)
    assert ownllm(["tokenizer", "train", "--params", params.source_file]) == 0
    return params


@pytest.mark.slow
def test_same_params_give_identical_tokenizer_files(trained, tmp_path):
    """A second run in a fresh process (new hash seeds in the Rust trainer) writes the same bytes."""
    second = make_params(tmp_path, data={"dedup": {"out": trained.data.dedup.out}})
    subprocess.run([sys.executable, "-m", "pipeline.cli", "tokenizer", "train", "--params", second.source_file],
                   cwd=REPO, check=True, capture_output=True)
    first_dir, second_dir = Path(trained.tokenizer.out), Path(second.tokenizer.out)
    names = sorted(p.name for p in first_dir.iterdir())
    assert names == sorted(p.name for p in second_dir.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (first_dir / name).read_bytes() == (second_dir / name).read_bytes(), name


def test_other_seed_gives_other_sample(trained, tmp_path):
    other = make_params(tmp_path, seed=99, data={"dedup": {"out": trained.data.dedup.out}})
    assert ownllm(["tokenizer", "train", "--params", other.source_file]) == 0
    assert (Path(other.tokenizer.out) / "tokenizer.json").read_bytes() != \
        (Path(trained.tokenizer.out) / "tokenizer.json").read_bytes()


def test_autotokenizer_loads_with_special_tokens_as_single_ids(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(trained.tokenizer.out)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == EOS and tok.pad_token == FIM_PAD
    specials = special_tokens(trained.tokenizer.reserved_tokens)
    assert specials[-1] == "<|reserved_3|>"
    assert set(specials[1:]) <= set(tok.additional_special_tokens)
    assert len(tok) == trained.tokenizer.vocab_size
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    assert len(set(ids.values())) == len(specials)
    for t, i in ids.items():  # alone and inside code, each special token is exactly one id
        assert tok(t)["input_ids"] == [i]
        assert tok.decode([i]) == t
    text = f"{FIM_PREFIX}def f(x):\n{FIM_SUFFIX}    return y\n{FIM_MIDDLE}    y = x{EOS}"
    enc = tok(text)
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids
    for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, EOS):
        assert enc["input_ids"].count(ids[t]) == 1
    assert tok.decode(enc["input_ids"]) == text
    # The model never gets a BOS token it did not ask for.
    assert tok("x = 1")["input_ids"] == load_fast(trained.tokenizer.out).encode("x = 1").ids


def test_lossless_on_real_code_with_odd_unicode_and_tabs(trained):
    from transformers import AutoTokenizer

    fast = load_fast(trained.tokenizer.out)
    hf = AutoTokenizer.from_pretrained(trained.tokenizer.out)
    texts = [d["content"] for d in stdlib_docs()] + [unicode_tabs_doc(), "\t\t\n \n\r\n", "💥" * 7, "x\u0000y", "  lead", " "]
    for text in texts:
        ids = fast.encode(text).ids
        assert fast.decode(ids) == text
        assert hf.decode(hf(text)["input_ids"]) == text
    # Never an unknown token: every byte is in the base alphabet.
    assert fast.token_to_id("<unk>") is None


def test_indentation_runs_do_not_explode(trained):
    from pipeline.tokenizer.measure import indentation_cost, indentation_probe

    fast = load_fast(trained.tokenizer.out)
    probe = indentation_probe(fast)
    assert probe["16_spaces"] <= 2 and probe["32_spaces"] <= 4, probe
    code = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    cost = indentation_cost(fast, [code])
    assert cost["chars_per_token"] > 4, cost  # one token per space would be ~1
    assert cost["tokens_per_indented_line"] <= 1.5, cost


def test_report_compares_with_baseline(trained):
    report = json.loads((Path(trained.tracking.reports_dir) / "tokenizer.json").read_text())
    assert report["vocab_size"] == trained.tokenizer.vocab_size
    assert report["lossless_failures_heldout"] == 0
    assert report["heldout"]["documents"] > 0
    for name in ("ours", "baseline_bytelevel"):
        bpt = report[name]["bytes_per_token"]
        assert {"python", "all"} <= set(bpt) and all(v > 1 for v in bpt.values())
        cov = report[name]["vocab_coverage"]
        assert 0 < cov["fraction"] <= 1 and cov["used_on_heldout"] <= cov["learned_tokens"]
        assert report[name]["indentation"]["indent_tokens"] > 0
    assert report["bytes_per_token_ratio_vs_baseline"]["all"] == pytest.approx(
        report["ours"]["bytes_per_token"]["all"] / report["baseline_bytelevel"]["bytes_per_token"]["all"], abs=1e-3)


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    params = make_params(tmp_path)  # no data/dedup written
    assert ownllm(["tokenizer", "train", "--params", params.source_file]) == 2
    assert "dedup" in capsys.readouterr().err
