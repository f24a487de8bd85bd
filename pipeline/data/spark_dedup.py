"""`ownllm data dedup` on Spark: exact, then MinHash-LSH near-duplicates, the BigCode way, same answer.

The steps are those of pipeline/data/dedup.py, distributed, from the pieces both share (pipeline/data/dedup_spec.py):

1. exact: :func:`minhash.content_hash` per document (mapInArrow), the smallest id per hash is kept;
2. signatures: :class:`dedup_spec.SignatureSpec` per document (mapInArrow), the same hash functions and seed;
3. candidates: :func:`minhash.band_hashes`, then ``groupBy(band, key)``; each bucket emits its pairs
   with the rule of :func:`minhash.candidate_pairs` (all pairs up to ``max_bucket``, else first and
   neighbour, in the local engine's document order: lang, then id);
4. verification: :func:`minhash.verify_pairs` on the two signatures of each candidate pair;
5. clusters: connected components by large-star / small-star (Kiveris et al., "Connected Components in
   MapReduce and Beyond", 2014) on DataFrames, iterated until the edge set stops changing. Each
   component converges to a star around its smallest id, and the smallest id is exactly the document
   dedup.py keeps (:func:`minhash.representative` with ids as keys), so the label *is* the representative.

graphframes would give connected components too, but it is a JVM package fetched at session start,
which a cluster without internet (or this CI) cannot do; the two star operations are a few joins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import DedupConfig, Params
from pipeline.data import minhash
from pipeline.data.dedup_spec import EXACT, NEAR, STAGE, SignatureSpec, banding, cluster_size_histogram
from pipeline.data.records import CLEAN_SCHEMA, DOC_COLUMNS, REJECT_SCHEMA
from pipeline.data.spark_io import read_docs_df, spread, write_docs_df, write_rejected_df

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class ComponentsDidNotConverge(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ per-document
def _content_hashes(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for b in batches:
        hashes = [minhash.content_hash(c) for c in b.column("content").to_pylist()]
        yield pa.RecordBatch.from_arrays([b.column("id"), pa.array(hashes, pa.string())], names=["id", "hash"])


def _signatures(spec: SignatureSpec, bands: int, rows: int):
    """mapInArrow body: (id, lang, has_shingles, sig as little-endian uint32 bytes, band keys as int64)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            out = [spec(t) for t in b.column("content").to_pylist()]
            sigs = np.stack([s for s, _ in out]) if out else np.empty((0, len(spec.a)), np.uint32)
            keys = minhash.band_hashes(sigs, bands, rows).view(np.int64) if out else np.empty((0, bands), np.int64)
            yield pa.RecordBatch.from_arrays([
                b.column("id"), b.column("lang"),
                pa.array([ok for _, ok in out], pa.bool_()),
                pa.array([s.astype("<u4").tobytes() for s in sigs], pa.binary()),
                pa.array(list(keys), pa.list_(pa.int64())),
            ], names=["id", "lang", "has_shingles", "sig", "keys"])
    return run


# ---------------------------------------------------------------------------------- candidate pairs
def _bucket_pairs(max_bucket: int):
    """mapInArrow body over buckets: the pairs :func:`minhash.candidate_pairs` makes of one bucket."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            src: list[str] = []
            dst: list[str] = []
            for members in b.column("members").to_pylist():
                # Local order is the table order, (lang, id); pairs are emitted (earlier, later).
                ids = [m["id"] for m in sorted(members, key=lambda m: (m["lang"], m["id"]))]
                k = len(ids)
                if k <= max_bucket:
                    i, j = np.triu_indices(k, k=1)
                else:
                    i = np.r_[np.zeros(k - 1, dtype=np.int64), np.arange(k - 1)]
                    j = np.r_[np.arange(1, k), np.arange(1, k)]
                src += [ids[x] for x in i]
                dst += [ids[x] for x in j]
            yield pa.RecordBatch.from_arrays([pa.array(src, pa.string()), pa.array(dst, pa.string())],
                                             names=["src", "dst"])
    return run


def _verify(threshold: float):
    """mapInArrow body over pairs joined with both signatures: keep those :func:`minhash.verify_pairs` keeps."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            n = b.num_rows
            if n == 0:
                continue
            a = np.stack([np.frombuffer(s, "<u4") for s in b.column("sig_src").to_pylist()])
            c = np.stack([np.frombuffer(s, "<u4") for s in b.column("sig_dst").to_pylist()])
            pairs = np.stack([np.arange(n), np.arange(n, 2 * n)], axis=1)
            keep = minhash.verify_pairs(np.concatenate([a, c]), pairs, threshold)[:, 0]
            yield pa.RecordBatch.from_arrays([b.column("src").take(keep), b.column("dst").take(keep)],
                                             names=["src", "dst"])
    return run


def candidate_edges(sigs: "DataFrame", cfg: DedupConfig) -> tuple["DataFrame", "DataFrame"]:
    """``(candidates, edges)``: LSH candidate pairs (src < dst in local order) and those that verify."""
    from pyspark.sql import functions as F

    exploded = (sigs.where("has_shingles")
                .select("id", "lang", F.posexplode("keys").alias("band", "key")))
    buckets = (exploded.groupBy("band", "key")
               .agg(F.collect_list(F.struct("lang", "id")).alias("members"))
               .where(F.size("members") > 1).select("members"))
    # Checkpointed: counted for the metrics and verified, without recomputing the bucket shuffle.
    pairs = buckets.mapInArrow(_bucket_pairs(cfg.max_bucket), "src string, dst string").distinct().localCheckpoint()
    if not cfg.verify:
        return pairs, pairs
    s = sigs.select("id", "sig")
    joined = (pairs.join(s.withColumnRenamed("id", "src").withColumnRenamed("sig", "sig_src"), "src")
                   .join(s.withColumnRenamed("id", "dst").withColumnRenamed("sig", "sig_dst"), "dst"))
    edges = joined.select("src", "dst", "sig_src", "sig_dst").mapInArrow(_verify(cfg.threshold),
                                                                         "src string, dst string")
    return pairs, edges


# ------------------------------------------------------------------------------ connected components
def _large_star(edges: "DataFrame") -> "DataFrame":
    """Every node links its larger neighbours to the smallest node of its neighbourhood (itself included)."""
    from pyspark.sql import functions as F

    both = edges.select(F.col("hi").alias("u"), F.col("lo").alias("v")).union(
        edges.select(F.col("lo").alias("u"), F.col("hi").alias("v")))
    mins = both.groupBy("u").agg(F.least(F.min("v"), F.first("u")).alias("m"))
    return (both.join(mins, "u").where(F.col("v") > F.col("u"))
            .select(F.col("v").alias("hi"), F.col("m").alias("lo")).distinct())


def _small_star(edges: "DataFrame") -> "DataFrame":
    """Every node links itself and its smaller neighbours to the smallest of them."""
    from pyspark.sql import functions as F

    mins = edges.groupBy("hi").agg(F.min("lo").alias("m"))
    to_min = edges.join(mins, "hi").where(F.col("lo") != F.col("m")).select(
        F.col("lo").alias("hi"), F.col("m").alias("lo"))
    return to_min.union(mins.select("hi", F.col("m").alias("lo"))).distinct()


def connected_components_df(edges: "DataFrame", max_iterations: int) -> tuple["DataFrame", int]:
    """``(node, label)`` for every node of an undirected edge list ``(src, dst)``: label = smallest node id.

    Alternates large-star and small-star until a round leaves the edge set unchanged (checked, not
    assumed); raises :class:`ComponentsDidNotConverge` after ``max_iterations`` rounds.
    """
    from pyspark.sql import functions as F

    current = (edges.where(F.col("src") != F.col("dst"))
               .select(F.greatest("src", "dst").alias("hi"), F.least("src", "dst").alias("lo"))
               .distinct().localCheckpoint())
    size = current.count()
    for rounds in range(1, max_iterations + 1):
        # Checkpointing each round's edges keeps the plan (and lineage) one round long.
        nxt = _small_star(_large_star(current)).localCheckpoint()
        nxt_size = nxt.count()
        # Both are duplicate-free sets: equal sizes and an empty difference mean equal sets.
        if nxt_size == size and nxt.exceptAll(current).isEmpty():
            labels = nxt.select(F.col("hi").alias("node"), F.col("lo").alias("label")).union(
                nxt.select(F.col("lo").alias("node"), F.col("lo").alias("label"))).distinct()
            return labels, rounds
        current, size = nxt, nxt_size
    raise ComponentsDidNotConverge(f"connected components did not converge in {max_iterations} rounds "
                                   f"(raise spark.cc_max_iterations)")


# ----------------------------------------------------------------------------------------- the stage
def decide(docs: "DataFrame", cfg: DedupConfig, seed: int, max_iterations: int) -> tuple["DataFrame", dict]:
    """Per document ``(id, exact_keep, near_keep, final, reason, has_shingles)`` plus LSH counters."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    bands, rows = banding(cfg)
    lsh = {"bands": bands, "rows": rows, "candidate_pairs": 0, "verified_pairs": 0, "docs_without_shingles": 0}
    base = docs.select("id", "lang", "content")
    if cfg.exact:
        hashed = spread(base.select("id", "content")).mapInArrow(_content_hashes, "id string, hash string")
        exact = hashed.withColumn("exact_keep", F.min("id").over(Window.partitionBy("hash"))).select("id", "exact_keep")
    else:
        exact = base.select("id", F.col("id").alias("exact_keep"))
    exact = exact.persist(StorageLevel.MEMORY_AND_DISK)
    survivors = base.join(exact.where("id = exact_keep").select("id"), "id")

    near = survivors.select("id", F.col("id").alias("near_keep"), F.lit(False).alias("has_shingles"))
    if not cfg.near:  # as dedup.py: with near dedup off no survivor counts as having shingles
        lsh["docs_without_shingles"] = survivors.count()
    else:
        spec = SignatureSpec.from_config(cfg, seed)
        schema = "id string, lang string, has_shingles boolean, sig binary, keys array<long>"
        sigs = spread(survivors).mapInArrow(_signatures(spec, bands, rows), schema).persist(StorageLevel.MEMORY_AND_DISK)
        candidates, edges = candidate_edges(sigs, cfg)
        edges = edges.localCheckpoint()
        lsh.update(candidate_pairs=candidates.count(), verified_pairs=edges.count(),
                   docs_without_shingles=sigs.where("NOT has_shingles").count())
        labels, lsh_rounds = connected_components_df(edges, max_iterations)
        near = (sigs.select("id", "has_shingles").join(labels.withColumnRenamed("node", "id"), "id", "left")
                .select("id", F.coalesce("label", "id").alias("near_keep"), "has_shingles"))
    near = near.persist(StorageLevel.MEMORY_AND_DISK)
    # An exact copy points at whatever its kept copy points at (dedup.py: final[exact_keep]).
    decided = (exact.join(near.select(F.col("id").alias("exact_keep"), F.col("near_keep").alias("final")), "exact_keep")
               .join(near.select("id", "near_keep", "has_shingles"), "id", "left")
               .withColumn("reason", F.when(F.col("id") != F.col("exact_keep"), F.lit(EXACT))
                           .when(F.col("id") != F.col("final"), F.lit(NEAR)).otherwise(F.lit(""))))
    return decided.persist(StorageLevel.MEMORY_AND_DISK), lsh


def _histogram(decided: "DataFrame", keep_col: str, where: str | None = None) -> dict[str, int]:
    """dedup_spec.cluster_size_histogram from cluster sizes counted by Spark (only clusters of 2+ are sent back)."""
    from pyspark.sql import functions as F

    df = decided.where(where) if where else decided
    sizes = [r["n"] for r in df.groupBy(keep_col).agg(F.count("*").alias("n")).where("n > 1").collect()]
    return cluster_size_histogram(np.repeat(np.arange(len(sizes)), sizes))


def dedup_metrics(docs: "DataFrame", decided: "DataFrame", lsh: dict) -> dict:
    """The metrics dedup.dedup_table reports, computed with Spark aggregations."""
    from pyspark.sql import functions as F

    info = docs.select("id", "lang", "source", "size_bytes")
    d = decided.join(info, "id").persist()  # small columns only; read by every aggregation below
    totals = d.agg(F.count("*").alias("n"), F.sum("size_bytes").alias("b"),
                   F.sum(F.when(F.col("reason") == "", F.col("size_bytes"))).alias("b_out"),
                   F.sum((F.col("reason") == "").cast("long")).alias("n_out"),
                   F.sum((F.col("reason") == EXACT).cast("long")).alias("exact"),
                   F.sum((F.col("reason") == NEAR).cast("long")).alias("near")).collect()[0]
    removed = d.where("reason != ''")
    by_lang: dict[str, dict[str, int]] = {}
    for r in removed.groupBy("lang", "reason").count().collect():
        by_lang.setdefault(r["lang"], {})[r["reason"]] = r["count"]
    final_source = info.select(F.col("id").alias("final"), F.col("source").alias("final_source"))
    cross = removed.join(final_source, "final").where("source != final_source").count()
    largest = d.groupBy("final").count().agg(F.max("count")).collect()[0][0]
    return {
        "documents_in": int(totals["n"]),
        "documents_out": int(totals["n_out"] or 0),
        "bytes_in": int(totals["b"] or 0),
        "bytes_out": int(totals["b_out"] or 0),
        "exact_duplicates": int(totals["exact"] or 0),
        "near_duplicates": int(totals["near"] or 0),
        "removed_by_lang": {lang: dict(sorted(c.items())) for lang, c in sorted(by_lang.items())},
        "cross_source_duplicates": int(cross),
        "exact_clusters": _histogram(d, "exact_keep"),
        "near_clusters": _histogram(d, "near_keep", "id = exact_keep"),
        "largest_cluster": int(largest or 0),
        "lsh": lsh,
    }


def run_dedup_spark(params: Params, spark: "SparkSession") -> dict:
    """dedup.run_dedup on Spark: the same data/dedup, data/rejected/dedup and metrics."""
    from pyspark.sql import functions as F

    cfg = params.data.dedup
    docs = read_docs_df(spark, cfg.input)
    decided, lsh = decide(docs, cfg, params.seed, params.spark.cc_max_iterations)
    with_docs = docs.join(decided.select("id", "reason", "final"), "id")
    kept = with_docs.where("reason = ''").select(*CLEAN_SCHEMA.names)
    rejected = with_docs.where("reason != ''").select(
        *DOC_COLUMNS, F.lit(STAGE).alias("stage"), "reason", F.col("final").alias("detail"))
    write_docs_df(kept, cfg.out, CLEAN_SCHEMA, params.data.ingest.row_group_rows, params.spark.max_rows_per_file)
    write_rejected_df(rejected.select(*REJECT_SCHEMA.names), cfg.rejected)
    metrics = dedup_metrics(docs, decided, lsh)
    spark.catalog.clearCache()
    return metrics
