"""Training data: MDS shards → StreamingDataset → FIM/next-token collator → batches, and back again.

Sample order is a pure function of params (``shuffle_seed``, ``num_canonical_nodes``, the global batch) by
mosaicml-streaming's design, and the FIM randomness of a sample is a pure function of ``seed`` and the
sample's index. Together they make any step's batch recoverable after the fact: ``batch_for_step(params,
step)`` rebuilds it, bit for bit, without having trained. The bisect stage builds on these functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.train.fim import IGNORE_INDEX, Codec, FimTokens, permute
from pipeline.train.span_corruption import SpanTokens, corrupt

SHUFFLE_ALGO = "py1e"  # streaming's default; pinned because the order depends on it


def _streaming_dataset_class():
    from streaming import StreamingDataset

    class TracedStreamingDataset(StreamingDataset):
        """A StreamingDataset whose samples carry their own global index, so every batch can name its samples."""

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            sample = super().get_item(sample_id, retry)
            sample["sample_idx"] = int(sample_id)
            return sample

    return TracedStreamingDataset


def split_dir(params: Params, split: str) -> Path:
    path = Path(params.shards.out) / split
    if not (path / "index.json").is_file():
        raise FileNotFoundError(f"no MDS shards at {path} (index.json missing): run `ownllm data shards` first")
    return path


def readable_copy(shards: Path, cache_root: Path) -> Path:
    """A directory of the split's shards that streaming can read without writing next to them.

    ``data/shards`` is a DVC output of zstd-compressed MDS. Given ``local=`` alone, streaming decompresses
    each shard *into* that directory, which changes the output DVC hashed; given ``remote=`` and ``local=``,
    it refuses a second dataset over the same ``local`` in one process (bisect and the trainer open several).
    So the shards are decompressed once into a cache (an uncompressed MDS copy) keyed by the index and the
    compressed files' sizes and mtimes (a new ``dvc checkout`` or rebuild gets a new key), and every dataset
    reads that copy ``local=`` only. Uncompressed shards are read in place. The copy is safe to delete; it is rebuilt on demand.
    """
    import hashlib
    import os
    import tempfile

    from filelock import FileLock
    from streaming.base.compression import decompress

    index_bytes = (shards / "index.json").read_bytes()
    index = json.loads(index_bytes)
    infos = index["shards"]
    if not any(info.get("compression") for info in infos):
        return shards
    key = hashlib.blake2b(index_bytes, digest_size=10)
    for info in infos:
        st = (shards / info["zip_data"]["basename"]).stat()
        key.update(f"{info['zip_data']['basename']}:{st.st_size}:{st.st_mtime_ns}".encode())
    dest = Path(cache_root) / f"{shards.name}-{key.hexdigest()}"
    if (dest / "index.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):  # ranks of one node share the copy; the first one makes it
        if (dest / "index.json").is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        for info in infos:
            raw, zipped = info["raw_data"], info["zip_data"]
            data = decompress(info["compression"], (shards / zipped["basename"]).read_bytes())
            if len(data) != raw["bytes"]:
                raise ValueError(f"{shards / zipped['basename']}: decompresses to {len(data)} bytes, "
                                 f"index.json says {raw['bytes']}; the shards are corrupt, rebuild them")
            (tmp / raw["basename"]).write_bytes(data)
        # An uncompressed dataset as far as streaming can tell (it would evict raw files without their zips).
        for info in infos:
            info["compression"], info["zip_data"] = None, None
        (tmp / "index.json").write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
        os.replace(tmp, dest)
    return dest


def make_dataset(params: Params, split: str, device_batch_size: int):
    """The StreamingDataset of one split. Train is shuffled by params; val is read in order."""
    cls = _streaming_dataset_class()
    train = split == "train"
    local = readable_copy(split_dir(params, split), Path(params.shards.cache_dir))
    return cls(local=str(local), shuffle=train, shuffle_seed=params.train.shuffle_seed,
               shuffle_algo=SHUFFLE_ALGO, num_canonical_nodes=params.train.num_canonical_nodes,
               batch_size=device_batch_size)


@dataclass
class Collator:
    """Turns MDS samples into a model batch, applying FIM or span corruption per document with a per-sample
    seeded RNG.

    One uniform draw per document picks its objective: FIM below ``fim_rate``, span corruption below
    ``fim_rate + span_rate``, next-token otherwise (so a zero ``span_rate`` leaves every FIM decision, and
    every earlier run, exactly as it was). Labels are the input ids with ``<fim_pad>`` positions set to -100
    (the model shifts them itself). Besides the model inputs the batch carries ``sample_idx`` and
    ``doc_ids`` (for the batch log and the spike detector) and per-sample objective counts; the Hugging
    Face wrapper drops the extra keys.
    """

    tokenizer: Any
    seed: int
    fim_rate: float
    spm_rate: float
    min_tokens: int
    span_rate: float = 0.0
    span_mean: float = 3.0
    span_density: float = 0.15
    fim: FimTokens = field(init=False)
    codec: Codec = field(init=False)
    span_tokens: SpanTokens | None = field(init=False)

    def __post_init__(self):
        self.fim = FimTokens.from_tokenizer(self.tokenizer)
        self.codec = Codec(self.tokenizer)
        self.span_tokens = SpanTokens.from_tokenizer(self.tokenizer) if self.span_rate > 0 else None

    @classmethod
    def from_params(cls, params: Params, tokenizer) -> "Collator":
        t = params.train
        return cls(tokenizer, params.seed, t.fim_rate, t.fim_spm_rate, t.fim_min_tokens,
                   t.span_corruption_rate, t.span_mean_length, t.span_noise_density)

    def transform(self, tokens: np.ndarray, spans: list, sample_idx: int) -> tuple[np.ndarray, int, int, int]:
        """One sample → (ids, documents FIM-transformed, documents span-corrupted, documents seen).

        Deterministic in (seed, sample_idx)."""
        rng = np.random.default_rng([self.seed, int(sample_idx)])
        out = np.asarray(tokens, dtype=np.int64).copy()
        n_fim = n_span = 0
        for _doc, _doc_start, start, n in spans:
            u = rng.random()
            if u >= self.fim_rate + self.span_rate or n < self.min_tokens:
                continue
            if u < self.fim_rate:
                res = permute(self.codec.decode(tokens[start:start + n]), self.codec, self.fim, n, rng, self.spm_rate)
                if res is not None:
                    out[start:start + n] = res.tokens
                    n_fim += 1
            else:
                sc = corrupt(tokens[start:start + n], self.span_tokens, rng, self.span_density, self.span_mean)
                if sc is not None:
                    out[start:start + n] = sc.tokens
                    n_span += 1
        return out, n_fim, n_span, len(spans)

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        ids, fims, span_docs, docs = [], [], [], []
        for s in samples:
            x, n_fim, n_span, n_docs = self.transform(s["tokens"], s["doc_spans"], s["sample_idx"])
            ids.append(x)
            fims.append(n_fim)
            span_docs.append(n_span)
            docs.append(n_docs)
        input_ids = torch.from_numpy(np.stack(ids))
        labels = input_ids.clone()
        labels[labels == self.fim.pad] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "labels": labels,
            "sample_idx": torch.tensor([s["sample_idx"] for s in samples], dtype=torch.long),
            "fim_docs": torch.tensor(fims, dtype=torch.long),
            "span_docs": torch.tensor(span_docs, dtype=torch.long),
            "n_docs": torch.tensor(docs, dtype=torch.long),
            "doc_ids": [[span[0] for span in s["doc_spans"]] for s in samples],
        }


def load_tokenizer(params: Params):
    from transformers import AutoTokenizer

    path = Path(params.tokenizer.out)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}: run `ownllm tokenizer train` first")
    return AutoTokenizer.from_pretrained(str(path))


@dataclass
class StepBatch:
    """A training step's batch, recovered from params alone."""

    step: int
    sample_idx: list[int]
    doc_ids: list[list[str]]
    batch: dict[str, Any]


def batch_for_step(params: Params, step: int, tokenizer=None) -> StepBatch:
    """Rebuild the global batch that training step ``step`` (0-based) consumed, from params alone.

    Streaming resumes mid-epoch from (epoch, sample_in_epoch) exactly as Composer's autoresume does, so
    this is the same code path that training itself takes after a restart. Samples come out in global
    order, so with several processes the recovered batch is the union of the ranks' micro-batches.
    """
    return batches_for_steps(params, [step], tokenizer)[0]


def batches_for_steps(params: Params, steps: list[int], tokenizer=None) -> list[StepBatch]:
    tokenizer = tokenizer or load_tokenizer(params)
    collate = Collator.from_params(params, tokenizer)
    gbs = params.train.global_batch_size
    ds = make_dataset(params, "train", gbs)
    out = []
    try:
        per_epoch = ds.size // gbs
        for step in steps:
            epoch, b = divmod(int(step), per_epoch)
            ds.next_epoch = epoch  # iterating advanced it; a resume state older than it would be ignored
            ds.load_state_dict({"epoch": epoch, "sample_in_epoch": b * gbs, "shuffle_seed": params.train.shuffle_seed,
                                "num_canonical_nodes": params.train.num_canonical_nodes})
            it = iter(ds)
            samples = [next(it) for _ in range(gbs)]
            del it
            batch = collate(samples)
            out.append(StepBatch(int(step), batch["sample_idx"].tolist(), batch["doc_ids"], batch))
    finally:
        release(ds)
    return out


def release(ds) -> None:
    """Free a dataset's shared memory now, so another dataset over the same directory can open in this process."""
    import gc

    del ds
    gc.collect()
