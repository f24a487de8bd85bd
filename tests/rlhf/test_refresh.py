"""The refresh job: does the work once, then "nothing to do" until new feedback arrives."""

from __future__ import annotations

import pytest

from rlhf.refresh import read_state, refresh
from rlhf_fixtures import make_store, rlhf_params


def test_empty_store_is_nothing_to_do(tmp_path, tiny_model_dir):
    params = rlhf_params(tmp_path, tiny_model_dir)
    url = make_store(tmp_path, tiny_model_dir, [])
    out = refresh(params, url)
    assert out.status == "nothing_to_do" and out.exit_code == 0
    assert not (tmp_path / "models").exists() and read_state(params.rlhf.state_file) == {}


def test_same_snapshot_as_last_refresh_is_nothing_to_do(tmp_path, tiny_model_dir):
    from rlhf.snapshot import take_snapshot
    from pipeline.tracking import write_json
    from rlhf_fixtures import sample_decisions

    params = rlhf_params(tmp_path, tiny_model_dir)
    url = make_store(tmp_path, tiny_model_dir, sample_decisions(3))
    digest = take_snapshot(params, url)[0].content_hash
    write_json(params.rlhf.state_file, {"snapshot_hash": digest, "status": "registered", "version": "ft-x"})
    out = refresh(params, url)
    assert out.status == "nothing_to_do"
    assert not (tmp_path / "models").exists() and not (tmp_path / "data/feedback").exists()
