"""The MinHash building blocks, on real standard-library code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data import minhash as mh
from benchmarks.dedup_labelled import jaccard, shingle_set
from tests.conftest import STDLIB, stdlib_files

A, B = mh.permutations(256, 1234)


def sig(text: str) -> np.ndarray:
    return mh.signature(mh.shingles(text), A, B)


# ------------------------------------------------------------------------------------ exact dedup
def test_content_hash_ignores_line_endings_and_trailing_blanks_but_not_indentation():
    text = stdlib_files(["bisect.py"])["bisect.py"]
    messy = "\n\n" + "\r\n".join(line + "  \t" for line in text.split("\n")) + "\n\n\n"
    assert mh.content_hash(messy) == mh.content_hash(text)
    reindented = text.replace("    ", "  ")
    assert mh.content_hash(reindented) != mh.content_hash(text)
    assert mh.content_hash(text + "x") != mh.content_hash(text)


# -------------------------------------------------------------------------------------- shingles
def test_shingles_are_a_set_of_token_5grams_blind_to_layout():
    text = stdlib_files(["heapq.py"])["heapq.py"]
    sh = mh.shingles(text)
    assert sh.dtype == np.uint64 and np.all(np.diff(sh.astype(np.float64)) >= 0)
    assert len(sh) == len(np.unique(sh)) == len(shingle_set(text))  # no collisions on real code
    spaced = text.replace(" ", "   ").replace("\n", "\n\n")
    assert np.array_equal(mh.shingles(spaced), sh)


def test_shingles_depend_on_token_order_and_handle_short_and_empty_texts():
    assert not np.array_equal(mh.shingles("a b c d e"), mh.shingles("e d c b a"))
    assert len(mh.shingles("a b c d e f")) == 2
    assert len(mh.shingles("only three tokens")) == 1  # fewer than n tokens: one shingle of all of them
    assert len(mh.shingles("+-*/ {} ;;; \n")) == 0
    assert len(mh.shingles("")) == 0
    assert len(mh.shingles("naïve 名前 = ünïcode_ok + x1 x2 x3")) > 0
    # The token pattern is a parameter: with \S+ punctuation becomes tokens too.
    assert not np.array_equal(mh.shingles("a = b ; c = d", 2, r"\S+"), mh.shingles("a = b ; c = d", 2))


def test_vectorised_tokenizer_agrees_with_the_regex_on_real_and_unicode_text():
    """The default pattern is scanned over UTF-8 bytes; any other pattern runs as a regex. Same tokens."""
    texts = list(stdlib_files(["heapq.py", "textwrap.py", "locale.py"]).values())
    texts += ["naïve 名前 = ünïcode_ok + x1\u2028x2 \U0001F600x3 é_é", "", "___", "a", "  ab\tcd  "]
    for text in texts:
        regex_twin = r"(?:[A-Za-z_0-9])+"  # the same language, taken down the regex path
        assert np.array_equal(mh.token_hashes(text), mh.token_hashes(text, regex_twin))
        assert len(mh.token_hashes(text)) == len(mh.token_regex(mh.DEFAULT_TOKEN_PATTERN).findall(text))
    # A token hashes the same wherever it stands.
    h = mh.token_hashes("alpha beta alpha  gamma\nalpha")
    assert h[0] == h[2] == h[4] and len(set(h.tolist())) == 3


def test_shingle_hashes_are_stable_across_processes_and_hash_seeds():
    code = ("from pipeline.data.minhash import shingles, permutations, signature; import sys; "
            "t = open(sys.argv[1]).read(); a, b = permutations(64, 7); "
            "print(shingles(t)[:5].tolist(), signature(shingles(t), a, b)[:5].tolist())")
    outs = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code, str(STDLIB / "colorsys.py")], env=env,
                                capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1


# ------------------------------------------------------------------------------------- signatures
def test_permutations_are_seeded_and_in_range():
    a1, b1 = mh.permutations(256, 1)
    a2, b2 = mh.permutations(256, 1)
    a3, _ = mh.permutations(256, 2)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2) and not np.array_equal(a1, a3)
    assert a1.dtype == b1.dtype == np.uint64 and (a1 & np.uint64(1)).all()  # odd multipliers
    assert a1.max() > 2**62 and b1.max() > 2**62  # drawn from the full 64-bit range
    with pytest.raises(ValueError, match="num_perm"):
        mh.permutations(0, 1)


def test_signature_estimates_jaccard_of_real_file_pairs():
    files = stdlib_files(["heapq.py", "bisect.py", "textwrap.py"])
    heapq, textwrap = files["heapq.py"], files["textwrap.py"]
    lines = heapq.split("\n")
    pairs = [
        (heapq, "\n".join(lines[: len(lines) * 3 // 4])),  # truncated: J about 0.75
        (heapq, "\n".join(lines[len(lines) // 3:])),  # J about 0.65
        (heapq, textwrap),  # unrelated: J about 0
        (heapq, heapq.replace("heap", "pile")),  # heavy rename
    ]
    for x, y in pairs:
        true = jaccard(shingle_set(x), shingle_set(y))
        est = float((sig(x) == sig(y)).mean())
        assert abs(est - true) < 0.08, (true, est)


def test_signature_estimate_is_unbiased_over_seeds():
    """Averaged over independent permutation sets the estimate converges to the true Jaccard.

    (A family whose permutations are correlated, e.g. ``(a*x + b) mod (2^61 - 1)`` with ``a, b < 2^32``,
    which never wraps, is biased upwards by about 0.03 here.)
    """
    text = stdlib_files(["heapq.py"])["heapq.py"]
    lines = text.split("\n")
    other = "\n".join(lines[: len(lines) * 3 // 4])
    true = jaccard(shingle_set(text), shingle_set(other))
    sx, sy = mh.shingles(text), mh.shingles(other)
    ests = [(mh.signature(sx, *p) == mh.signature(sy, *p)).mean() for p in (mh.permutations(256, s) for s in range(16))]
    assert abs(float(np.mean(ests)) - true) < 0.015, (true, np.mean(ests))


def test_signature_is_a_function_of_the_set_and_empty_sets_match_nothing():
    sh = mh.shingles(stdlib_files(["bisect.py"])["bisect.py"])
    shuffled = np.random.default_rng(0).permutation(np.concatenate([sh, sh]))
    assert np.array_equal(mh.signature(sh, A, B), mh.signature(shuffled, A, B))
    assert mh.signature(sh, A, B).dtype == np.uint32
    empty = mh.signature(np.empty(0, np.uint64), A, B)
    assert (empty == np.iinfo(np.uint32).max).all()
    assert (empty == mh.signature(sh, A, B)).mean() < 0.01


# ------------------------------------------------------------------------------------------- LSH
def test_optimal_bands_matches_datasketch_for_the_same_weights():
    from datasketch.lsh import _optimal_param

    for threshold, num_perm in ((0.7, 128), (0.5, 64), (0.85, 128)):
        assert mh.optimal_bands(threshold, num_perm, 0.5, 0.5) == _optimal_param(threshold, num_perm, 0.5, 0.5)
    assert mh.optimal_bands(0.7, 256, 0.5, 0.5) == (25, 10)  # datasketch's choice for our params
    assert mh.optimal_bands(0.7, 256) == (32, 8)  # recall-weighted default: candidates get verified
    with pytest.raises(ValueError, match="threshold"):
        mh.optimal_bands(1.0, 256)


def test_band_hashes_agree_for_equal_bands_only():
    s1 = sig(stdlib_files(["heapq.py"])["heapq.py"])
    s2 = s1.copy()
    s2[3] ^= 1  # differs in band 0 only (rows 0..7)
    k = mh.band_hashes(np.stack([s1, s2]), 32, 8)
    assert k.shape == (2, 32) and k.dtype == np.uint64
    assert k[0, 0] != k[1, 0] and np.array_equal(k[0, 1:], k[1, 1:])
    assert np.array_equal(mh.band_hashes(s1, 32, 8), k[0])  # one signature or a matrix: same keys
    same_values = np.full(256, 7, dtype=np.uint32)
    assert len(set(mh.band_hashes(same_values, 32, 8).tolist())) == 32  # bands are seeded by index
    with pytest.raises(ValueError, match="bands"):
        mh.band_hashes(s1[:100], 32, 8)


def test_candidate_pairs_all_pairs_in_small_buckets_linear_in_large_ones():
    keys = np.array([[1, 5], [1, 6], [2, 5], [1, 7], [3, 8]], dtype=np.uint64)
    assert mh.candidate_pairs(keys).tolist() == [[0, 1], [0, 2], [0, 3], [1, 3]]
    big = np.zeros((100, 1), dtype=np.uint64)
    pairs = mh.candidate_pairs(big, max_bucket=10)
    assert len(pairs) == 99 + 98 and set(mh.connected_components(100, pairs).tolist()) == {0}
    assert mh.candidate_pairs(np.arange(6, dtype=np.uint64).reshape(3, 2)).shape == (0, 2)


# -------------------------------------------------------------------------------------- clusters
def test_connected_components_are_transitive_and_order_independent():
    edges = np.array([[4, 2], [2, 7], [0, 5], [7, 9]])
    labels = mh.connected_components(10, edges)
    assert labels.tolist() == [0, 1, 2, 3, 2, 0, 6, 2, 8, 2]
    assert np.array_equal(mh.connected_components(10, edges[::-1, ::-1]), labels)
    assert mh.connected_components(3, np.empty((0, 2))).tolist() == [0, 1, 2]


def test_representative_is_the_smallest_key_in_each_cluster():
    labels = np.array([0, 0, 2, 0, 2, 5])
    ids = ["c", "a", "z", "b", "y", "q"]
    assert mh.representative(labels, ids).tolist() == [1, 1, 4, 1, 4, 5]


def test_a_chain_of_near_duplicates_collapses_to_one_cluster():
    """A~B and B~C while A and C are below the threshold: one cluster, not pairs."""
    lines = stdlib_files(["textwrap.py"])["textwrap.py"].split("\n")
    a, b, c = ("\n".join(lines[s:s + 300]) for s in (0, 36, 72))
    sa, sb, sc = (shingle_set(t) for t in (a, b, c))
    assert jaccard(sa, sb) > 0.75 and jaccard(sb, sc) > 0.75 and jaccard(sa, sc) < 0.65
    sigs = np.stack([sig(a), sig(b), sig(c)])
    pairs = mh.candidate_pairs(mh.band_hashes(sigs, 32, 8))
    edges = mh.verify_pairs(sigs, pairs, 0.7)
    assert [0, 2] not in edges.tolist()  # A and C are not similar enough by themselves
    labels = mh.connected_components(3, edges)
    assert len(set(labels.tolist())) == 1
    assert len(set(mh.representative(labels, ["id-b", "id-a", "id-c"]).tolist())) == 1
