"""The serving and feedback sections of params.yaml (`serve`, `feedback`), owned by this package.

``FeedbackParams`` extends the pipeline's schema with them; it is registered under the ``ownllm.params``
entry point (pyproject.toml), so ``pipeline.config.load_params`` validates them in every stage's file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import Params, Section, load_params


class UpstreamConfig(Section):
    """One model version's own upstream server (an A/B test can compare two vLLM deployments)."""

    url: str  # OpenAI-compatible base URL, e.g. http://vllm-tuned:8000/v1
    # template: the gateway sends the FIM prompt as plain `prompt` (vLLM rejects `suffix`); suffix: forwards
    # OpenAI's `suffix` (servers that build FIM prompts themselves, e.g. another ownllm gateway); infill: a
    # suffix goes to llama.cpp's /infill (llama-server rejects `suffix` too but has its own FIM endpoint).
    fim: Literal["template", "suffix", "infill"] = "template"
    model: str | None = None  # the name the upstream serves it under (default: the version's name)
    api_key_env: str | None = None  # env var with its key (default: serve.upstream_api_key_env)


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    db_url: str = "sqlite:///var/feedback.db"
    # local: in-process transformers, loading each routed version's `path`; openai: forward to upstream_url.
    backend: Literal["local", "openai"] = "local"
    model_dir: str = "models/base"
    upstream_url: str | None = None  # e.g. http://vllm:8000/v1
    upstream_api_key_env: str = "OWNLLM_UPSTREAM_API_KEY"  # name of the env var holding the upstream key
    upstream_fim: Literal["template", "suffix", "infill"] = "template"  # how a suffix reaches upstream_url (UpstreamConfig.fim)
    # Per model version (by name): its own upstream, whatever `backend` says; others use the default.
    upstreams: dict[str, UpstreamConfig] = {}
    device: str = "cpu"
    num_threads: int | None = Field(None, ge=1)  # torch threads of the transformers backend; None = torch default
    # The in-process engine for a version whose directory has the CTranslate2 conversion (<dir>/ct2/, written
    # by `ownllm export`); a directory without it, or engine: transformers, is served by transformers.
    engine: Literal["ctranslate2", "transformers"] = "ctranslate2"
    quantization: Literal["float32", "int8"] = "float32"  # CTranslate2 compute type, applied at load
    # CTranslate2 threads per model version. 1 by default: on the 2-core box the default model decodes 32 tokens in
    # 5.3 ms on 1 thread, 17.2 ms on 2 (77 ms back to back: OpenMP's passive waits), the 125M shape within 6 % on
    # both, and the other core is left to the event loop and the store (benchmarks/bench_engine_threads.py;
    # docs/BENCHMARKS.md, "Serving, fourth pass").
    engine_threads: int = Field(1, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)  # requests arriving this close share a decoding batch
    max_batch: int = Field(32, ge=1)  # rows (prompts x n) per decoding batch
    # Threads for generation without a batcher of its own (transformers, upstream HTTP) and for relaying
    # streams; AnyIO's pool is left to the store queries, so health, metrics and feedback never wait.
    max_concurrent_generations: int = Field(256, ge=1)
    # Apply a version's suggestion filter (registered with it by `ownllm rlhf register`): a choice the filter
    # predicts will be rejected is returned empty (Tabby: dropped) and logged with status `filtered`; streamed
    # requests to such a version are decided before their first byte.
    suggestion_filter: bool = False
    max_prompt_chars: int = Field(32_000, ge=1)
    max_tokens_limit: int = Field(512, ge=1)
    max_n: int = Field(8, ge=1)
    max_stop: int = Field(4, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_feedback_batch: int = Field(1000, ge=1)
    # POST /v1/feedback: the requests waiting are written in one transaction (feedback/ingest.py); false =
    # one transaction per request (the old path, kept as benchmarks/bench_serve.py's baseline).
    feedback_group_commit: bool = True
    # A key's user and a (key, model)'s route, backend and filter are reused for this long (0 = look up every
    # request): two store queries off every completion's critical path. A key revoked or a rollout changed by
    # another process takes effect within it; a rollout changed in the console of this process, at once.
    lookup_cache_s: float = Field(1.0, ge=0, le=60)
    # A completion's rows are completed after its reply (feedback/inflight.py): feedback, Tabby events and GET
    # /v1/completions/{id} naming a completion still `pending` wait (retry) this long for it, then use what is stored.
    pending_feedback_wait_s: float = Field(5.0, ge=0, le=60)
    sqlite_busy_timeout_s: float = Field(10.0, gt=0)
    retention_days: int = Field(30, ge=1)


class SimulateConfig(Section):
    users: int = Field(4, ge=1)
    files: int = Field(24, ge=1)  # held-out files replayed, spread round-robin over languages
    cursors_per_file: int = Field(2, ge=1)
    min_line_chars: int = Field(8, ge=1)  # a cursor line has at least this much non-blank text
    min_kept_chars: int = Field(4, ge=1)  # a cursor leaves at least this many non-blank characters to type
    # A suggestion counts as accepted when the part the user accepts (partial accept, cut at a word
    # boundary) holds at least this many whole words: one word is the smallest unit editors accept.
    min_accept_words: int = Field(1, ge=1)
    # Suggestions per cursor (the gateway's `n`), as an IDE that lets its user cycle through several: the
    # closest one is accepted if it passes the accept rule, the others rejected (preference pairs).
    # 1 = one greedy suggestion.
    choices: int = Field(2, ge=1)
    temperature: float = Field(0.8, gt=0, le=2)  # sampling when choices > 1 (seeded per cursor)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(32, ge=1)
    max_context_chars: int = Field(2000, ge=16)  # prefix/suffix characters sent, as an editor plugin would
    bounties: int = Field(16, ge=0)  # demo bounties derived from held-out functions with docstrings
    model_name: str = "base"  # the version name serve.model_dir is registered under when absent
    reset: bool = True  # replace the previous simulated traffic (so reruns give the same store and reports)
    # True: the user types what they kept and the editor asks again on the next line, naming the file, so the
    # gateway derives kept_text from that request (feedback/kept.py, kept_source 'derived'); False: the user
    # reports kept_text with each event (kept_source 'simulated'). params.yaml turns it on for the default pipeline.
    typing: bool = False
    seed: int = 11


class FeedbackConfig(Section):
    simulate: SimulateConfig = SimulateConfig()
    reports_dir: str = "reports/feedback"
    report_days: float = Field(30.0, gt=0)  # default window of `ownllm feedback report`
    ab_alpha: float = Field(0.05, gt=0, lt=1)  # two-sided significance level of the A/B test
    ab_power: float = Field(0.8, gt=0, lt=1)  # power for the "needed sample size" of the A/B verdict
    # Editors (feedback/tabby.py, feedback/continue_events.py, feedback/kept.py):
    ignored_after_s: float = Field(10.0, gt=0)  # viewed, then neither accepted nor dismissed within this: ignored
    derive_window_s: float = Field(600.0, gt=0)  # later requests of the same file this recent settle kept_text
    tabby_max_tokens: int = Field(64, ge=1)  # Tabby-shaped requests carry no max_tokens
    tabby_temperature: float = Field(0.0, ge=0, le=2)  # ... nor, usually, a temperature: greedy
    tabby_seed: int | None = Field(None, ge=0)  # ... nor a seed: this one when sampling (None = unseeded)


class FeedbackParams(Params):
    """params.yaml with the gateway's and the feedback loop's sections."""

    serve: ServeConfig = ServeConfig()
    feedback: FeedbackConfig = FeedbackConfig()


def load_feedback_params(path: str | Path = "params.yaml") -> FeedbackParams:
    """``load_params`` typed for this package (and correct even where the entry points are not installed)."""
    return load_params(path, FeedbackParams)
