"""The one request type: the OpenAI shape becomes a CompletionInput, the service logs client fields, and a
user who opted out of code storage leaves hashes and counts but no code text."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select, update

from feedback.backends import GenRequest, Sampling
from feedback.models import Completion, User
from feedback.requests import CompletionInput


def test_a_completion_input_names_a_bad_client():
    with pytest.raises(ValueError, match="client must be one of openai, tabby, continue, simulated"):
        CompletionInput(prefix="x", client="emacs")


def test_a_gen_request_is_the_input_sampling_plus_its_text():
    sp = Sampling(max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=("\n",), seed=3)
    gen = GenRequest.of("def f(", ")", sp)
    assert isinstance(gen, Sampling) and (gen.prompt, gen.suffix) == ("def f(", ")")
    assert Sampling(**{k: getattr(gen, k) for k in vars(sp)}) == sp


def test_the_service_logs_client_file_and_repo(gateway):
    with gateway.factory() as s:
        user = s.scalar(select(User).where(User.name == "alice"))
    inp = CompletionInput(prefix="def f(x):\n    return", suffix="\n", language="python", client="tabby",
                          filepath="src/f.py", git_url="https://example.org/r.git",
                          sampling=Sampling(max_tokens=4, temperature=0))
    out = gateway.app.state.service.complete(inp, user)
    assert out["id"].startswith("cmpl-") and len(out["choices"]) == 1
    with gateway.factory() as s:
        row = s.scalar(select(Completion).where(Completion.request_id == out["id"]))
    assert (row.client, row.filepath, row.git_url, row.status) == ("tabby", "src/f.py", "https://example.org/r.git",
                                                                    "served")
    assert row.prompt == inp.prefix and row.completion == out["choices"][0]["text"]


def test_a_user_without_code_storage_gets_hashes_only(gateway):
    with gateway.factory.begin() as s:
        s.execute(update(User).where(User.name == "bob").values(store_code=False))
    try:
        r = httpx.post(f"{gateway.url}/v1/completions", headers=gateway.headers("bob"), timeout=60,
                       json={"model": "auto", "prompt": "import os\n", "suffix": "\n", "max_tokens": 4,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        with gateway.factory() as s:
            row = s.scalar(select(Completion).where(Completion.request_id == r.json()["id"]))
        assert row.prompt is None and row.suffix is None and row.completion is None
        assert row.prompt_hash and row.suffix_hash and row.completion_tokens >= 0
    finally:
        with gateway.factory.begin() as s:
            s.execute(update(User).where(User.name == "bob").values(store_code=True))
