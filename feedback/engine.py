"""The in-process inference engine: CTranslate2, with dynamic batching across concurrent requests.

Why CTranslate2 (docs/serving.md, "Choosing the engine"; numbers in docs/BENCHMARKS.md): a pip wheel for
CPU and CUDA, int8 quantisation at load time, batched generation with a per-token callback (streaming and
cancel per row), and it loads the Hugging Face Llama export through its own converter. It is the engine
Tabby started on.

- ``ownllm export`` writes the conversion next to the Hugging Face files, in ``<model dir>/ct2/`` (float32,
  byte-identical on rerun; ``serve.quantization: int8`` quantises when loading, so one artefact serves
  both). A model directory without ``ct2/`` is served by transformers (:class:`feedback.backends.LocalBackend`).
- :class:`Batcher`: one thread per model version owns the generator. Requests that arrive within
  ``batch_wait_ms`` of each other share one ``generate_batch`` call (a request's ``n`` choices are rows of
  it too), grouped by their sampling knobs, which CTranslate2 applies per call; requests that arrive while a
  batch decodes share the next one. A lone request (one editor typing) never waits for company.
- Seeds: CTranslate2 4.8 samples from one thread-local generator per worker thread, seeded once
  (``set_random_seed`` does not reseed it: OpenNMT/CTranslate2#1757), so it cannot honour a per-request
  seed. A *seeded sampled* request is therefore served by the transformers path with a generator of its
  own (:class:`feedback.backends.SeededGumbel`); greedy and unseeded requests are batched here.

:meth:`CT2Engine.generate_batch` is the plain batch API (token ids in, token ids out) for offline replays.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from feedback.backends import (BackendError, GenRequest, Generation, LocalBackend, StopScanner, Stream,
                               StreamDelta, cut_at_stop)
from pipeline.train.export import ct2_dir, convert_to_ct2, has_ct2  # noqa: F401 (the gateway imports them here)

log = logging.getLogger("ownllm.engine")

QUANTIZATIONS = {"float32": "float32", "int8": "int8_float32"}  # serve.quantization -> CT2 compute_type
STREAM_TIMEOUT_S = 120.0  # a stream that sees no token for this long ends with an error, never hangs


# ------------------------------------------------------------------------------------------------ batcher
@dataclass
class Job:
    """One request's rows in the batcher: ``n`` copies of the prompt, decoded together with other jobs."""

    ids: list[int]
    n: int
    max_new: int
    temperature: float
    top_p: float
    stop_ids: frozenset[int]
    # Called from the batcher thread with (choice, token id, tokens so far); returns True to stop that row.
    on_token: Callable[[int, int, list[int]], bool] | None = None
    # Record each row's per-token log-probabilities in ``token_logprobs`` (the suggestion filter's feature).
    logprobs: bool = False
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    token_logprobs: list[list[float]] | None = None  # set before the future resolves, when ``logprobs``
    in_company: bool = False  # another request arrived within the batcher's window before this one (Batcher.submit)

    @property
    def key(self) -> tuple:
        """Jobs with the same key can share a generate_batch call (CT2 takes these knobs per call)."""
        return (self.temperature if self.temperature > 0 else 0.0, self.top_p if self.temperature > 0 else 1.0,
                self.max_new)


class Batcher:
    """A thread that decodes the jobs queued for it in batches.

    When the engine is idle, a job waits up to ``wait_ms`` for others to share its batch only if requests are
    coming in together: another arrived within ``wait_ms`` before it, or the last batch held several jobs. A
    lone request (one editor typing: the usual case) is decoded at once, so the window costs it nothing (it was
    5 ms of a 23 ms completion on the default model: docs/BENCHMARKS.md). Jobs that queue while a batch decodes
    are collected without waiting.

    Written here because CTranslate2 batches what it is given in one call but does not gather requests that
    arrive separately (its ``asynchronous`` mode queues each call as its own batch).
    """

    def __init__(self, generator, tok, wait_ms: float = 5.0, max_rows: int = 32, name: str = "ct2"):
        self.generator, self.tok = generator, tok
        self.wait_s, self.max_rows = wait_ms / 1000.0, max_rows
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # generate_batch calls made (tests and metrics)
        self.rows = 0
        self.waits = 0  # batches that waited for company (tests)
        self._last_arrival = float("-inf")
        self._last_jobs = 0  # jobs in the last batch collected
        self.thread = threading.Thread(target=self._run, name=f"ownllm-batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        if not self.thread.is_alive():
            raise BackendError("the inference engine's batcher has stopped")
        now = time.monotonic()
        job.in_company = now - self._last_arrival < self.wait_s  # a burst: another request just arrived
        self._last_arrival = now
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(30)

    def _collect(self, first: Job) -> list[Job]:
        jobs, rows = [first], first.n
        wait = first.in_company or self._last_jobs > 1 or not self.queue.empty()
        self.waits += wait
        deadline = time.monotonic() + (self.wait_s if wait else 0.0)
        while rows < self.max_rows:
            left = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close(): finish what was collected, then stop
                self.queue.put(None)
                break
            jobs.append(job)
            rows += job.n
        self._last_jobs = len(jobs)
        return jobs

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            groups: dict[tuple, list[Job]] = {}
            for job in self._collect(first):
                if job.cancelled.is_set():
                    job.future.cancel()
                    continue
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                self._decode([j for j in jobs if j.future.set_running_or_notify_cancel()])

    def _decode(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        rows = [(job, c) for job in jobs for c in range(job.n)]
        tokens = [self.tok.convert_ids_to_tokens(job.ids) for job in jobs]
        start = [tokens[k] for k, job in enumerate(jobs) for _ in range(job.n)]
        seen: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        want_logprobs = any(j.logprobs for j in jobs)
        stops = sorted(set().union(*(j.stop_ids for j in jobs)))
        temperature, top_p, max_new = jobs[0].key

        def step(s) -> bool:  # runs in this thread, once per generated token of each row
            job, choice = rows[s.batch_id]
            seen[s.batch_id].append(s.token_id)
            if want_logprobs:
                logprobs[s.batch_id].append(s.log_prob)
            if job.cancelled.is_set():
                return True
            return bool(job.on_token and job.on_token(choice, s.token_id, seen[s.batch_id]))

        # The per-token callback takes the GIL once per row and token: only pay for it when a row streams or has
        # stop sequences (a plain completion cannot be cut short anyway; it is returned whole).
        # Per-token log-probabilities reach Python only through the callback (with return_scores on; the
        # result's own score is the mean over every generated token, not over the text a stop string cut).
        needs_callback = want_logprobs or any(j.on_token is not None for j in jobs)
        kw = dict(max_length=max_new, include_prompt_in_result=False, return_end_token=True, end_token=stops,
                  callback=step if needs_callback else None, return_scores=want_logprobs)
        if temperature > 0:
            kw.update(sampling_topk=0, sampling_topp=top_p, sampling_temperature=temperature)
        try:
            results = self.generator.generate_batch(start, **kw)
        except Exception as exc:  # every waiting request learns of it
            log.exception("generate_batch failed")
            for job in jobs:
                job.future.set_exception(BackendError(f"generation failed: {exc}"))
            return
        self.batches += 1
        self.rows += len(rows)
        out: dict[int, list[list[int]]] = {}
        for (job, _), res, got, lps in zip(rows, results, seen, logprobs):
            # A row stopped by its callback ends where the callback said; the result holds the same tokens.
            ids = list(res.sequences_ids[0]) if res.sequences_ids else got
            out.setdefault(id(job), []).append(ids)
            if job.logprobs:
                job.token_logprobs = (job.token_logprobs or []) + [lps]
        for job in jobs:
            job.future.set_result(out[id(job)])


# ------------------------------------------------------------------------------------------------ engine
class CT2Engine:
    """A CTranslate2 generator with its batcher, loaded from ``<model dir>/ct2`` (converted on the fly into
    ``convert_into`` when the directory has no conversion, for offline use)."""

    def __init__(self, model_dir: str | Path, quantization: str = "float32", num_threads: int | None = None,
                 batch_wait_ms: float = 5.0, max_batch: int = 32, device: str = "cpu", tok=None,
                 convert_into: str | Path | None = None):
        import ctranslate2

        if quantization not in QUANTIZATIONS:
            raise BackendError(f"serve.quantization {quantization!r} is not one of {sorted(QUANTIZATIONS)}")
        path = ct2_dir(model_dir)
        if not has_ct2(model_dir):
            if convert_into is None:
                raise BackendError(f"no CTranslate2 model in {path} (run `ownllm export`, or use "
                                   f"serve.engine: transformers)")
            path = convert_to_ct2(model_dir, convert_into)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok = tok
        self.quantization = quantization
        self.generator = ctranslate2.Generator(str(path), device=device, compute_type=QUANTIZATIONS[quantization],
                                               inter_threads=1, intra_threads=num_threads or 0)
        self.batcher = Batcher(self.generator, tok, batch_wait_ms, max_batch, Path(model_dir).name)

    def submit(self, job: Job) -> Future:
        return self.batcher.submit(job)

    def generate_batch(self, prompts_ids: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                       top_p: float = 1.0, stop_ids: list[int] | None = None) -> list[list[int]]:
        """Token ids of one completion per prompt (end token included when generation ended on one).

        Offline batch API (held-out replays): all prompts go to the batcher at once, so they are decoded
        together (``max_batch`` rows per call) alongside whatever else is being served.
        """
        stops = frozenset(stop_ids if stop_ids is not None else [self.tok.eos_token_id])
        futures = [self.submit(Job(list(p), 1, max_new_tokens, temperature, top_p, stops)) for p in prompts_ids]
        return [f.result()[0] for f in futures]

    def close(self) -> None:
        self.batcher.close()


# ------------------------------------------------------------------------------------------------ backend
class CT2Backend(LocalBackend):
    """The gateway's backend on the CTranslate2 engine: same prompts, stops and finish reasons as
    :class:`LocalBackend` (it is one, for the tokenizer side); the transformers weights load only if a
    seeded sampled request needs them (see the module docstring)."""

    def __init__(self, model_dir: str | Path, quantization: str = "float32", num_threads: int | None = None,
                 batch_wait_ms: float = 5.0, max_batch: int = 32, device: str = "cpu"):
        super().__init__(model_dir, device=device, num_threads=num_threads, load_model=False)
        self.engine = CT2Engine(model_dir, quantization, num_threads, batch_wait_ms, max_batch, device, tok=self.tok)

    @staticmethod
    def needs_own_generator(req: GenRequest) -> bool:
        return req.temperature > 0 and req.seed is not None

    def _job(self, req: GenRequest, ids: list[int], on_token=None) -> Job:
        return Job(ids, req.n, req.max_tokens, req.temperature, req.top_p, frozenset(self.stop_ids), on_token,
                   logprobs=req.logprobs)

    def _stop_check(self, req: GenRequest):
        """A callback ending a row once its completion text holds a stop sequence (the cut is exact later)."""
        if not req.stop:
            return None

        def check(_choice: int, _token: int, so_far: list[int]) -> bool:
            return any(s in self.tok.decode(so_far, skip_special_tokens=True) for s in req.stop if s)

        return check

    def complete(self, req: GenRequest) -> Generation:
        fut = self.complete_future(req)
        return super().complete(req) if fut is None else fut.result()

    def complete_future(self, req: GenRequest) -> Future | None:
        """A future of the :class:`Generation`, resolved by the batcher thread (an async caller awaits it
        without holding a thread); None when the request needs the transformers path (seeded sampling)."""
        if self.needs_own_generator(req):
            return None
        ids = self.prompt_ids(req)
        job = self._job(req, ids, self._stop_check(req))
        out: Future = Future()

        def done(f: Future) -> None:
            if out.done():  # the caller cancelled first
                return
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                try:
                    lps = job.token_logprobs or [None] * len(f.result())
                    out.set_result(Generation([self._finish(r, req, lp) for r, lp in zip(f.result(), lps)], len(ids)))
                except Exception as exc:  # a decoding error is the request's, not the batcher's
                    out.set_exception(BackendError(f"decoding the completion failed: {exc}"))

        def cancel_job(f: Future) -> None:  # the caller gave up (client gone): drop the rows
            if f.cancelled():
                job.cancelled.set()

        out.add_done_callback(cancel_job)
        self.engine.submit(job).add_done_callback(done)
        return out

    def stream(self, req: GenRequest) -> Stream:
        if self.needs_own_generator(req):
            return super().stream(req)
        ids = self.prompt_ids(req)
        return Stream(self._stream_rows(req, ids), prompt_tokens=len(ids))

    def _stream_rows(self, req: GenRequest, ids: list[int]) -> Iterator[StreamDelta]:
        """All ``n`` choices decode together; deltas of different choices interleave (as OpenAI's do)."""
        tokens: queue.Queue = queue.Queue()
        stop_check = self._stop_check(req)

        def on_token(choice: int, token: int, so_far: list[int]) -> bool:
            tokens.put((choice, token))
            return bool(stop_check and stop_check(choice, token, so_far))

        job = self._job(req, ids, on_token)
        fut = self.engine.submit(job)
        fut.add_done_callback(lambda _f: tokens.put(None))
        scanners = [StopScanner(req.stop) for _ in range(req.n)]
        got: list[list[int]] = [[] for _ in range(req.n)]
        sent = [0] * req.n  # characters of each choice's decoded text already handed to its scanner
        ended = [False] * req.n
        stop_set = set(self.stop_ids)
        try:
            while True:
                try:
                    item = tokens.get(timeout=STREAM_TIMEOUT_S)
                except queue.Empty:
                    raise BackendError(f"generation produced nothing for {STREAM_TIMEOUT_S:.0f} s") from None
                if item is None:
                    break
                choice, token = item
                if ended[choice]:
                    continue
                if token in stop_set:
                    ended[choice] = True
                    continue
                got[choice].append(token)
                text = self.tok.decode(got[choice], skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                out = scanners[choice].feed(text[sent[choice]:])
                sent[choice] = len(text)
                if out:
                    yield StreamDelta(choice, out)
            if fut.exception() is not None:
                raise fut.exception()
            for c in range(req.n):
                text = self.tok.decode(got[c], skip_special_tokens=True)
                tail = scanners[c].feed(text[sent[c]:]) + scanners[c].flush()
                if tail:
                    yield StreamDelta(c, tail)
                hit = cut_at_stop(text, req.stop)[1]
                finish = "stop" if ended[c] or hit or scanners[c].stopped else "length"
                yield StreamDelta(c, "", finish, len(got[c]))
        finally:
            job.cancelled.set()  # the client left (or we are done): the batcher drops this job's rows

