"""Helpers for the training tests: real MDS shards of real stdlib code, in the shards-stage contract.

The shards stage (``ownllm data shards``) owns the production packer; these tests build their own small
shards with streaming's ``MDSWriter`` in exactly the contracted format, so training is tested against the
contract rather than against one implementation of it:

- ``tokens``: ``ndarray:int32`` of length ``max_seq_len`` (documents packed, ``<|endoftext|>`` between them);
- ``doc_spans``: json list of ``[doc_id, doc_token_start, sample_token_start, n_tokens]`` where
  ``tokens[sample_token_start:sample_token_start + n_tokens]`` is a slice of the document's tokens.
"""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

import numpy as np

STDLIB = Path(sysconfig.get_paths()["stdlib"])

TRAIN_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py",
               "keyword.py", "string.py", "numbers.py", "reprlib.py", "copy.py", "queue.py", "sched.py",
               "graphlib.py", "stat.py", "token.py", "struct.py", "cmd.py", "code.py"]
VAL_FILES = ["this.py", "abc.py", "opcode.py", "contextvars.py"]
SEQ_LEN = 64


def doc_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def pack_docs(docs: list[tuple[str, list[int]]], seq_len: int, eos: int) -> list[dict]:
    """Greedy packing of (doc_id, tokens) into fixed-length samples with per-document spans."""
    samples, cur, spans = [], [], []
    for did, toks in docs:
        pos = 0
        while pos < len(toks):
            take = min(len(toks) - pos, seq_len - len(cur))
            spans.append([did, pos, len(cur), take])
            cur.extend(toks[pos:pos + take])
            pos += take
            if len(cur) == seq_len:
                samples.append({"tokens": np.asarray(cur, np.int32), "doc_spans": spans})
                cur, spans = [], []
        if cur:  # the separator belongs to no document
            cur.append(eos)
            if len(cur) == seq_len:
                samples.append({"tokens": np.asarray(cur, np.int32), "doc_spans": spans})
                cur, spans = [], []
    return samples  # the ragged tail is dropped, as a packer with drop-last would


def write_shards(out: Path, texts: dict[str, str | list[int]], tokenizer_dir: Path, seq_len: int = SEQ_LEN) -> list[dict]:
    """Pack and write; a document given as a list of ids is taken as tokens (its id hashes their repr)."""
    from streaming import MDSWriter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = [(doc_id(t), tok(t, add_special_tokens=False)["input_ids"]) if isinstance(t, str) else (doc_id(repr(t)), t)
            for t in texts.values()]
    samples = pack_docs(docs, seq_len, tok.eos_token_id)
    if out.exists():
        shutil.rmtree(out)
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32", "doc_spans": "json"}, compression="zstd",
                   size_limit="1mb") as w:
        for s in samples:
            w.write(s)
    return samples


def read(names: list[str]) -> dict[str, str]:
    return {n: (STDLIB / n).read_text(encoding="utf-8") for n in names}


# A document that can poison training: one token repeated thousands of times (a classic spike trigger).
GARBAGE_DOC = "\n".join(["zQx" * 60] * 80) + "\n"


def tiny_params(tmp: Path, shards: Path, tokenizer: Path, **train_overrides) -> dict:
    """A params mapping (the schema of params.yaml) for a seconds-long CPU run under ``tmp``."""
    train = {
        "save_folder": str(tmp / "checkpoints"), "reports_dir": str(tmp / "reports/train"),
        "global_batch_size": 4, "device_microbatch_size": 4, "max_duration": "12ba", "lr": 3e-3,
        "warmup": "2ba", "eval_interval": "6ba", "eval_batches": 2, "save_interval": "4ba", "log_every": 1,
        "device": "cpu", "num_threads": 1, "final_model": str(tmp / "artifacts/train/final"),
    }
    train.update(train_overrides)
    return {
        "seed": 1234,
        "data": {"sources": [{"name": "stdlib", "kind": "dir", "path": "{stdlib}"}]},
        "tracking": {"wandb_mode": "disabled", "reports_dir": str(tmp / "reports"), "wandb_dir": str(tmp / "wandb")},
        "tokenizer": {"out": str(tokenizer)},
        "shards": {"out": str(shards), "max_seq_len": SEQ_LEN, "cache_dir": str(tmp / "shard-cache")},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "max_seq_len": SEQ_LEN},
        "train": train,
        "export": {"out": str(tmp / "models/base")},
    }


def write_params(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


TWO_DOC_SPANS = [["a", 0, 0, 30], ["b", 0, 30, SEQ_LEN - 30]]  # a 30-token document, then the rest of the sample


def collated_windows(collate, docs: list[np.ndarray], n: int = 400):
    """``n`` two-document samples cut from the concatenated ``docs``, each through ``collate``: (tokens, batch)."""
    stream = np.concatenate(docs)
    for i in range(n):
        start = (i * 131) % (len(stream) - SEQ_LEN)
        tokens = stream[start:start + SEQ_LEN].astype(np.int32)
        yield tokens, collate([{"tokens": tokens, "doc_spans": TWO_DOC_SPANS, "sample_idx": i}])
