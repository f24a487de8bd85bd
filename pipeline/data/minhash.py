"""MinHash near-duplicate detection as pure, vectorised functions.

The local dedup stage and the Spark engine call these same functions, so both find the same
duplicates. Everything here is a pure function of its arguments (no global state, no Python
``hash()``, which is salted per process): picklable, and identical on every machine and worker.

The method is the one of datasketch / BigCode / text-dedup:

1. a document becomes the set of its word 5-grams ("shingles") over ``[A-Za-z_0-9]+`` tokens, each
   hashed to 64 bits (:func:`shingles`);
2. each of ``num_perm`` universal hash functions is applied to every shingle and the minimum kept
   (:func:`signature`); two signatures agree in a position with probability equal to the Jaccard
   similarity of the two shingle sets;
3. the signature is cut into ``bands`` bands of ``rows`` values; documents that share any band key are
   candidates (:func:`band_hashes`, :func:`candidate_pairs`), the banding chosen so that pairs above the
   threshold collide with high probability (:func:`optimal_bands`);
4. candidates whose estimated Jaccard is below the threshold are dropped (:func:`verify_pairs`), the
   rest are edges of a graph whose connected components are the duplicate clusters
   (:func:`connected_components`), and one document per cluster is kept (:func:`representative`).

We vectorise with numpy instead of calling datasketch's ``MinHash`` per document: datasketch hashes
every shingle with SHA-1 in a Python loop and applies ``(a*x + b) mod (2^61 - 1)`` with a ``%`` on uint64.
We hash tokens once and combine them in numpy, and use the multiply-add-shift family, which is as
universal and needs half the passes over the (shingles x permutations) matrix (benchmarks/bench_data.py).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import xxhash

_U64 = np.uint64
# Shingle rows per block in :func:`signature`: a (block, num_perm) uint64 matrix stays near the cache.
_BLOCK = 512


# ------------------------------------------------------------------------------------ exact dedup
def normalise(content: str) -> str:
    """Content as exact dedup compares it.

    Line endings are unified (CRLF/CR → LF), trailing whitespace is stripped from every line and leading
    and trailing blank lines are dropped. Indentation and everything inside a line is kept: in Python
    it is meaning, and a file that differs in more than invisible whitespace is near-dedup's business.
    """
    lines = content.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def content_hash(content: str) -> str:
    """128-bit hash of the normalised content, as hex (xxh3: stable across machines and processes)."""
    return xxhash.xxh3_128_hexdigest(normalise(content).encode("utf-8", "surrogatepass"))


# -------------------------------------------------------------------------------------- shingles
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over all 64 output bits (in place on a copy)."""
    x = x.copy()
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


@lru_cache(maxsize=16)
def _position_multipliers(ngram: int) -> np.ndarray:
    # Distinct odd constants, one per position in the n-gram, so that "a b" and "b a" hash apart.
    rng = np.random.Generator(np.random.PCG64(0x5EED + ngram))
    return rng.integers(1, 1 << 63, size=ngram, dtype=np.uint64) * _U64(2) + _U64(1)


DEFAULT_TOKEN_PATTERN = r"[A-Za-z_0-9]+"
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_", np.uint8)] = True
_K = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64
_POWERS: dict[str, np.ndarray] = {}


@lru_cache(maxsize=16)
def token_regex(token_pattern: str) -> re.Pattern:
    return re.compile(token_pattern)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``K^i`` and ``K^-i`` mod 2^64 for ``i < n`` (grown by doubling and kept: the same for every call)."""
    if len(_POWERS.get("k", ())) < n:
        size = 1 << max(16, (n - 1).bit_length())
        with np.errstate(over="ignore"):
            _POWERS["k"] = np.cumprod(np.r_[_U64(1), np.full(size - 1, _K, np.uint64)], dtype=np.uint64)
            _POWERS["kinv"] = np.cumprod(np.r_[_U64(1), np.full(size - 1, pow(_K, -1, 1 << 64), np.uint64)],
                                         dtype=np.uint64)
    return _POWERS["k"][:n], _POWERS["kinv"][:n]


def _token_spans(text: str, token_pattern: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(utf8 bytes, starts, ends)`` of the tokens. The default pattern is ASCII-only, so it is found with
    one table lookup over the bytes (UTF-8 continuation bytes are >= 0x80, never word bytes); any other
    pattern runs as a regex and its tokens are laid end to end."""
    if token_pattern == DEFAULT_TOKEN_PATTERN:
        buf = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        word = np.r_[False, _WORD_BYTE[buf], False]
        edges = np.flatnonzero(word[1:] != word[:-1])
        return buf, edges[0::2], edges[1::2]
    tokens = [t.encode("utf-8", "surrogatepass") for t in token_regex(token_pattern).findall(text)]
    ends = np.cumsum(np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)))
    return np.frombuffer(b"".join(tokens), np.uint8), ends - np.fromiter(map(len, tokens), np.int64, len(tokens)), ends


def token_hashes(text: str, token_pattern: str = DEFAULT_TOKEN_PATTERN) -> np.ndarray:
    """A stable 64-bit hash of every token, in order, computed for all tokens at once.

    Each token's hash is the polynomial ``sum(byte_i * K^i) mod 2^64`` over its UTF-8 bytes, read off
    prefix sums of the whole text (``(P[end] - P[start]) * K^-start``), then finalised with splitmix64.
    Written by hand because a per-token call of a hash library (xxhash) costs a Python round trip per
    token: three times the time of this whole function on the embedded corpus.
    """
    buf, starts, ends = _token_spans(text, token_pattern)
    if len(starts) == 0:
        return np.empty(0, dtype=np.uint64)
    kpow, kinv = _powers(len(buf))
    prefix = np.empty(len(buf) + 1, dtype=np.uint64)
    prefix[0] = 0
    with np.errstate(over="ignore"):
        np.cumsum(buf.astype(np.uint64) * kpow, out=prefix[1:])
        return _mix64((prefix[ends] - prefix[starts]) * kinv[starts])


def shingles(text: str, ngram: int = 5, token_pattern: str = DEFAULT_TOKEN_PATTERN) -> np.ndarray:
    """The set of hashed word n-grams of ``text``: sorted unique uint64 values.

    An n-gram's hash is a position-weighted sum of its token hashes (mod 2^64), finalised with
    splitmix64: one numpy pass instead of one string join and one hash call per n-gram. A text with
    fewer than ``ngram`` tokens is one shingle of all its tokens; a text with no tokens has no shingles.
    """
    tok = token_hashes(text, token_pattern)
    if len(tok) == 0:
        return np.empty(0, dtype=np.uint64)
    n = min(ngram, len(tok))
    m = len(tok) - n + 1
    mult = _position_multipliers(n)
    with np.errstate(over="ignore"):
        combined = tok[:m] * mult[0]
        for i in range(1, n):
            combined += tok[i:i + m] * mult[i]
    return np.unique(_mix64(combined))


# ------------------------------------------------------------------------------------- signatures
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameters ``(a, b)`` of ``num_perm`` hash functions ``h(x) = ((a*x + b) mod 2^64) >> 32``.

    This is Dietzfelbinger's multiply-add-shift family: for 32-bit keys ``x`` and random 64-bit ``a``,
    ``b`` it is strongly universal (2-independent), the same guarantee as datasketch's
    ``(a*x + b) mod (2^61 - 1)`` (which in fact wraps at 2^64 before the modulus), but it needs only a
    multiply and an add per value: numpy's uint64 arithmetic wraps at 2^64 for free.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False) | _U64(1)
    b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def signature(shingle_hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (uint32, one value per permutation) of a set of shingle hashes.

    Position ``k`` is the minimum over shingles of ``h_k(x)`` with ``x`` the top 32 bits of the shingle
    hash: the minimum of the full 64-bit ``a*x + b`` is taken (its order is the order of the top 32
    bits, ties broken by the rest) and its top 32 bits are kept. An empty set gets all-ones, which
    matches nothing but another empty set; callers leave empty documents out of near dedup.
    """
    out = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    x32 = np.asarray(shingle_hashes, dtype=np.uint64) >> _U64(32)
    with np.errstate(over="ignore"):
        for start in range(0, len(x32), _BLOCK):
            block = np.multiply.outer(x32[start:start + _BLOCK], a)
            block += b
            np.minimum(out, block.min(axis=0), out=out)
    return (out >> _U64(32)).astype(np.uint32)


# ------------------------------------------------------------------------------------------- LSH
def _collision_probability(s: np.ndarray, bands: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return 1.0 - (1.0 - s ** rows) ** bands


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.1, fn_weight: float = 0.9) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising weighted false positive + negative mass.

    The same objective as datasketch's ``MinHashLSH`` (area under the collision curve below the
    threshold, and above it for misses), integrated on a fine grid for all (b, r) at once instead of one
    ``scipy.integrate.quad`` call per pair. The default weights favour recall (datasketch uses 0.5/0.5)
    because our candidates are verified against the threshold afterwards: a false candidate costs one
    signature comparison, a miss costs a duplicate in the training data.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    b, r = zip(*[(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    bands, rows = np.array(b, dtype=float)[:, None], np.array(r, dtype=float)[:, None]
    lo = np.linspace(0.0, threshold, 401)[None, :]
    hi = np.linspace(threshold, 1.0, 401)[None, :]
    fp = np.trapezoid(_collision_probability(lo, bands, rows), lo, axis=1)
    fn = np.trapezoid(1.0 - _collision_probability(hi, bands, rows), hi, axis=1)
    best = int(np.argmin(fp_weight * fp + fn_weight * fn))
    return int(b[best]), int(r[best])


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 key per band: ``(bands,)`` for one signature, ``(n, bands)`` for a matrix of them.

    Two documents are LSH candidates when they share the key of the same band. A band's ``rows`` values
    are folded into 64 bits (multiply-xor per value, then splitmix64), seeded by the band index so equal
    values in different bands give different keys.
    """
    sig = np.asarray(sig)
    if sig.shape[-1] < bands * rows:
        raise ValueError(f"signature has {sig.shape[-1]} values, {bands} bands x {rows} rows need {bands * rows}")
    cut = sig[..., : bands * rows].astype(np.uint64).reshape(*sig.shape[:-1], bands, rows)
    h = np.broadcast_to(np.arange(bands, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15), cut.shape[:-1]).copy()
    with np.errstate(over="ignore"):
        for j in range(rows):
            h ^= cut[..., j]
            h *= _U64(0x100000001B3)  # FNV-64 prime: odd, so each step is a bijection of the state
    return _mix64(h)


def candidate_pairs(keys: np.ndarray, max_bucket: int = 64) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of rows of ``keys`` (n, bands) that share a band key; unique, sorted.

    Within a bucket of up to ``max_bucket`` documents every pair is a candidate. A larger bucket (many
    near-identical tiny files) contributes each member paired with the bucket's first and its
    neighbour, which keeps the work linear and still connects all true duplicates that verify.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    n, nbands = keys.shape
    out = []
    for band in range(nbands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = np.sort(order[start:start + size])
            if size <= max_bucket:
                i, j = np.triu_indices(size, k=1)
                out.append(np.stack([members[i], members[j]], axis=1))
            else:
                first = np.full(size - 1, members[0])
                out.append(np.stack([first, members[1:]], axis=1))
                out.append(np.stack([members[:-1], members[1:]], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(out).astype(np.int64), axis=0)


def estimated_jaccard(sigs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of equal signature positions for each pair: the unbiased MinHash Jaccard estimate."""
    if len(pairs) == 0:
        return np.empty(0)
    return np.concatenate([(sigs[p[:, 0]] == sigs[p[:, 1]]).mean(axis=1) for p in np.array_split(pairs, max(1, len(pairs) // 4096))])


def verify_pairs(sigs: np.ndarray, pairs: np.ndarray, threshold: float) -> np.ndarray:
    """The candidate pairs whose estimated Jaccard reaches ``threshold`` (LSH alone lets some lower ones in)."""
    if len(pairs) == 0:
        return pairs
    return pairs[estimated_jaccard(sigs, pairs) >= threshold]


# -------------------------------------------------------------------------------------- clusters
def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes: the smallest node index in its component.

    Clusters are connected components, not pairs: if A~B and B~C, all three are one cluster even when
    A and C are not similar enough by themselves, so exactly one of them survives. Written by hand as a
    union-find (path halving, union by smaller root) because the edge list is small (verified duplicate
    pairs only), it needs no graph library, and the labels come out canonical (smallest index) whatever
    the edge order, which the Spark engine relies on when it collects edges to the driver.
    """
    parent = np.arange(n, dtype=np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in np.asarray(edges, dtype=np.int64).reshape(-1, 2):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def representative(labels: np.ndarray, keys: list | np.ndarray) -> np.ndarray:
    """For each node, the index of the one node its cluster keeps: the member with the smallest key.

    The stage passes document ids as keys: an id is a content hash, so the choice depends only on the
    documents in the cluster, never on input order, sources or the number of workers.
    """
    labels = np.asarray(labels)
    keys = np.asarray(keys)
    order = np.lexsort((keys, labels))  # by cluster, then key
    sorted_labels = labels[order]
    first = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    keep_of_label = dict(zip(sorted_labels[first].tolist(), order[first].tolist()))
    return np.array([keep_of_label[lab] for lab in labels.tolist()], dtype=np.int64)
