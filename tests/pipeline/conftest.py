"""Fixtures for the training tests (helpers live in train_helpers.py, importable by the test modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import TRAIN_FILES, VAL_FILES, read, write_shards


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """data/shards/{train,val} for a tiny run, plus the tokenizer, under one root."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(root / "train", read(TRAIN_FILES), tiny_model_dir)
    write_shards(root / "val", read(VAL_FILES), tiny_model_dir)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shards_dir, tiny_model_dir):
    """One tiny in-process training run (12 steps), shared by the determinism, data and export tests."""
    from train_helpers import tiny_params, write_params

    from pipeline.config import parse_params
    from pipeline.train.trainer import train

    tmp = tmp_path_factory.mktemp("run_a")
    data = tiny_params(tmp, shards_dir, tiny_model_dir)
    write_params(tmp / "params.yaml", data)
    params = parse_params(data, str(tmp / "params.yaml"))
    summary = train(params)
    return {"dir": tmp, "params": params, "data": data, "summary": summary}


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    """The tiny model's tokenizer, loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def stdlib_docs(tok):
    """Four real stdlib modules as token arrays (the FIM and span-corruption transforms' test input)."""
    import numpy as np

    texts = read(["textwrap.py", "shlex.py", "heapq.py", "colorsys.py"])
    return [np.asarray(tok(t, add_special_tokens=False)["input_ids"]) for t in texts.values()]
