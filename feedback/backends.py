"""Generation backends behind the gateway: in-process transformers, or an upstream OpenAI-compatible server.

The gateway owns auth, routing, A/B and logging; a backend only turns (prompt, suffix, sampling knobs)
into choices. ``LocalBackend`` runs ``model.generate`` (KV cache on, greedy or sampling) and builds FIM
prompts with the tokenizer's own FIM tokens; ``UpstreamBackend`` forwards to vLLM / TGI / Triton or any
server speaking ``/v1/completions``.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Protocol

# Serving, evaluation and tuning build the very same prompts: the one builder in pipeline/fim_prompt.py.
from pipeline.fim_prompt import (EOS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FimPromptBuilder, NoFimTokens,
                                 PromptTooLong, end_token_ids, fim_text)


class BackendError(RuntimeError):
    """Generation failed for a reason the client cannot fix (upstream down, model broken): a 502/503."""


class BadGenerationRequest(ValueError):
    """The request cannot be served by this model (e.g. max_tokens beyond its context): a 400."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How a completion is sampled: what every client API asks for (feedback.requests.CompletionInput carries
    one) and what every engine takes (a :class:`GenRequest` is one of these plus the text)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Also return each choice's mean token log-probability (the suggestion filter's feature; local engines only).
    logprobs: bool = False


@dataclass(frozen=True)
class GenRequest(Sampling):
    """``GenRequest(prompt, suffix=None, *, <Sampling's fields>)``."""

    prompt: str
    suffix: str | None = None

    @classmethod
    def of(cls, prompt: str, suffix: str | None, sampling: Sampling) -> "GenRequest":
        return cls(prompt=prompt, suffix=suffix, **{f.name: getattr(sampling, f.name) for f in fields(Sampling)})


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop sequence) | "length"
    completion_tokens: int
    # Mean log-probability of the tokens that make up ``text`` (pipeline.eval.generate.mean_logprob), when the
    # request asked for it.
    logprob: float | None = None


@dataclass
class Generation:
    choices: list[Choice]
    prompt_tokens: int


@dataclass
class StreamDelta:
    index: int
    text: str
    finish_reason: str | None = None  # set on the last delta of a choice
    completion_tokens: int = 0  # set with finish_reason


@dataclass
class Stream:
    """A streamed generation: iterate ``deltas``; ``prompt_tokens`` is known once iteration has started."""

    deltas: Iterator[StreamDelta]
    prompt_tokens: int = 0
    info: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def complete(self, req: GenRequest) -> Generation: ...

    def stream(self, req: GenRequest) -> Stream: ...


# -------------------------------------------------------------------------------------------- stop strings
def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Text up to the earliest stop sequence (excluded, as in the OpenAI API), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _completion_stop_criteria(tok, n_prompt: int, stops: tuple[str, ...]):
    """Generation criteria: a row is done once its *completion* text holds a stop sequence.

    Not transformers' ``stop_strings``: that matches the end of the whole sequence, prompt included, so a
    prompt ending in a space plus a first generated space "contains" the stop ``"  "`` and generation ends
    before the completion holds it (OpenAI stop sequences apply to the completion only).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopInCompletion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            texts = tok.batch_decode(input_ids[:, n_prompt:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops if s) for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return StoppingCriteriaList([_StopInCompletion()])


class StopScanner:
    """Streams text while holding back just enough to never emit the start of a stop sequence.

    Written by hand because transformers' streamers know nothing of OpenAI stop semantics (the stop
    sequence must not be sent, and may span token boundaries).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buf += piece
        text, hit = cut_at_stop(self.buf, self.stops)
        if hit:
            self.stopped, self.buf = True, ""
            return text
        safe = len(self.buf) - self.hold
        out, self.buf = (self.buf[:safe], self.buf[safe:]) if safe > 0 else ("", self.buf)
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


# ------------------------------------------------------------------------------------------ local model
class SeededGumbel:
    """A logits processor adding Gumbel noise drawn from a generator of the request's own.

    Written by hand because transformers' sampling draws from torch's process-wide generator
    (``torch.multinomial``), so two concurrent seeded requests (two A/B arms, say) would share one stream.
    By the Gumbel-max trick, greedy search over ``scores + Gumbel noise`` is an exact sample of
    ``softmax(scores)``.
    """

    def __init__(self, seed: int, device: str = "cpu"):
        import torch

        self.generator = torch.Generator(device=device).manual_seed(int(seed) % 2**63)

    def __call__(self, input_ids, scores):
        import torch

        u = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        return scores.float() - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


class LocalBackend:
    """A Hugging Face causal LM in this process. One generation at a time (a lock): on CPU, parallel
    generate calls only fight over the same cores and make every request slower.

    Seeded sampling draws from a ``torch.Generator`` of the request's own (:class:`SeededGumbel`), never from
    torch's process-wide generator, so a seeded request gives the same text whatever else is being served.
    With ``load_model=False`` the weights load on first use, so a subclass serving another format (the
    CTranslate2 engine) keeps this tokenizer side and loads the transformers model only if it needs it.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", num_threads: int | None = None,
                 load_model: bool = True):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise BackendError(f"no Hugging Face model in {path} (config.json missing; run the export stage)")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = path
        self.name = path.name
        self.device = device
        self.tok = AutoTokenizer.from_pretrained(path)
        self.max_context = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 2048))
        vocab = self.tok.get_vocab()
        self.fim_ids = {t: vocab.get(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else vocab.get(EOS)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.stop_ids = end_token_ids(self.tok)  # the same end tokens as evaluation (pipeline/fim_prompt.py)
        self.prompts = FimPromptBuilder(self.tok, self.max_context)
        self.lock = threading.Lock()
        self._model = None
        self._model_lock = threading.Lock()
        if load_model:
            self.model  # noqa: B018 - load now: the first request should not pay for it

    @property
    def model(self):
        """The transformers model, loaded once on first use."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    from transformers import AutoModelForCausalLM

                    self._model = AutoModelForCausalLM.from_pretrained(self.path).to(self.device).eval()
        return self._model

    # -- prompt ------------------------------------------------------------------------------------
    def prompt_ids(self, req: GenRequest) -> list[int]:
        """Token ids of the prompt from the one FIM prompt builder, fitted to the context (a 400 if it can't)."""
        try:
            return self.prompts.ids(req.prompt, req.suffix, req.max_tokens)
        except (PromptTooLong, NoFimTokens) as exc:
            raise BadGenerationRequest(str(exc)) from None

    def _gen_kwargs(self, req: GenRequest, ids: list[int], rows: int = 1, index: int = 0) -> dict:
        """``generate`` arguments for ``rows`` copies of the prompt; a seeded request samples with its own
        generator (seeded with ``seed + index``: streamed choices are separate generations)."""
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        x = torch.tensor([ids] * rows, device=self.device)
        kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=req.max_tokens, use_cache=True,
                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        if req.temperature > 0 and req.seed is not None:
            # argmax(warped logits + Gumbel noise) is a sample of the warped distribution; greedy search does
            # the argmax, so only this request's generator is drawn from.
            procs = [TemperatureLogitsWarper(req.temperature)]
            if req.top_p < 1:
                procs.append(TopPLogitsWarper(req.top_p))
            procs.append(SeededGumbel(req.seed + index, self.device))
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      logits_processor=LogitsProcessorList(procs))
        elif req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _finish(self, new_ids: list[int], req: GenRequest, token_logprobs: list[float] | None = None) -> Choice:
        ended = False
        if any(i in self.stop_ids for i in new_ids):
            first = next(k for k, i in enumerate(new_ids) if i in self.stop_ids)
            new_ids, ended = new_ids[:first], True
        text = self.tok.decode(new_ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, req.stop)
        logprob = None
        if token_logprobs is not None:
            # The same function as the held-out replay the suggestion filter was trained on.
            from pipeline.eval.generate import mean_logprob

            logprob = mean_logprob(self.tok, new_ids, token_logprobs, text, self.pad_id)
        return Choice(text, "stop" if ended or hit else "length", len(new_ids), logprob)

    # -- generation --------------------------------------------------------------------------------
    def complete(self, req: GenRequest) -> Generation:
        import torch

        ids = self.prompt_ids(req)
        greedy = req.temperature == 0
        rows = 1 if greedy or req.seed is None else req.n  # seeded: n rows drawn from the request's generator
        kw = self._gen_kwargs(req, ids, rows)
        if req.stop:  # stop early; the cut is exact below
            kw.update(stopping_criteria=_completion_stop_criteria(self.tok, len(ids), req.stop))
        if req.logprobs:
            kw.update(output_scores=True, return_dict_in_generate=True)
        with self.lock, torch.inference_mode():
            if greedy:  # greedy choices are identical: decode once
                out = self.model.generate(**kw)
            elif req.seed is not None:
                out = self.model.generate(**kw)
            else:
                out = self.model.generate(**kw, num_return_sequences=req.n)
            seqs = out.sequences if req.logprobs else out
            scores = (self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).tolist()
                      if req.logprobs else None)
        rows = [0] * req.n if greedy else list(range(len(seqs)))
        choices = [self._finish(seqs[r][len(ids):].tolist(), req, scores[r] if scores is not None else None)
                   for r in rows]
        return Generation(choices, len(ids))

    def stream(self, req: GenRequest) -> Stream:
        ids = self.prompt_ids(req)
        return Stream(self._stream(req, ids), prompt_tokens=len(ids))

    def _stream(self, req: GenRequest, ids: list[int]) -> Iterator[StreamDelta]:
        for index in range(req.n):  # choices one after another, each streamed token by token
            yield from self._stream_one(req, ids, index)

    def _stream_one(self, req: GenRequest, ids: list[int], index: int) -> Iterator[StreamDelta]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True, timeout=120)
        scanner, state = StopScanner(req.stop), {"cancel": False, "tokens": 0, "ended": False}
        stop_ids = set(self.stop_ids)

        class _Cancel(StoppingCriteria):  # stop generating once a stop sequence was seen or the client left
            def __call__(self, input_ids, scores, **kw):
                last = int(input_ids[0, -1])
                state["tokens"] = input_ids.shape[1] - len(ids)
                state["ended"] = state["ended"] or last in stop_ids
                return torch.full((input_ids.shape[0],), state["cancel"], dtype=torch.bool)

        kw = self._gen_kwargs(req, ids, index=index)
        kw.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancel()]))
        errors: list[BaseException] = []

        def run():
            with self.lock, torch.inference_mode():
                try:
                    self.model.generate(**kw)
                except BaseException as exc:  # surfaced to the consumer below
                    errors.append(exc)
                    streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        drained = False
        try:
            for piece in streamer:
                out = scanner.feed(piece)
                if out:
                    yield StreamDelta(index, out)
                if scanner.stopped:
                    state["cancel"] = True
            drained = True
            tail = scanner.flush()
            if tail:
                yield StreamDelta(index, tail)
        finally:
            state["cancel"] = True
            if not drained:  # the client went away: let the worker finish its current token and end
                for _ in streamer:
                    pass
            worker.join()
        if errors:
            raise BackendError(f"generation failed: {errors[0]}")
        stopped = scanner.stopped or state["ended"]
        yield StreamDelta(index, "", "stop" if stopped else "length", state["tokens"])


# ------------------------------------------------------------------------------------------- upstream
FIM_MODES = ("template", "suffix", "infill")


class UpstreamBackend:
    """Forwards to an OpenAI-compatible ``/v1/completions`` (vLLM, TGI, Triton, llama.cpp's ``llama-server``,
    or another ownllm gateway).

    ``fim`` says how a suffix reaches the server. ``template`` (the default): the gateway builds the prompt
    itself with the one builder (:func:`pipeline.fim_prompt.fim_text`, the model's own FIM tokens; a plain
    prompt starts after ``<|endoftext|>`` as in training) and sends it as a plain ``prompt``, the way Tabby's
    ``prompt_template`` does, because vLLM rejects ``suffix`` (400, "suffix is not currently supported") and
    TGI ignores it. ``suffix``: OpenAI's ``suffix`` field is forwarded, for servers that build FIM prompts
    themselves (another ownllm gateway). ``infill``: llama.cpp's ``llama-server``, which rejects ``suffix`` on
    /v1/completions (400 "Unsupported param: suffix") but builds the FIM prompt from the model's own FIM tokens
    at its own, non-OpenAI ``/infill`` (``input_prefix``/``input_suffix``, at the server's root: ``base_url``
    without ``/v1``); a request without a suffix goes to /v1/completions as in ``template`` mode.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 fim: str = "template"):
        import httpx

        if fim not in FIM_MODES:
            raise BackendError(f"upstream fim mode {fim!r} is not one of {', '.join(FIM_MODES)}")
        self.name = model
        self.model = model
        self.fim = fim
        base = base_url.rstrip("/")
        self.url = base + "/completions"
        self.infill_url = base.removesuffix("/v1") + "/infill"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)

    def prompt(self, req: GenRequest) -> str:
        """The ``prompt`` sent upstream: in ``template`` mode the full FIM (or plain) layout as text."""
        if self.fim == "suffix":
            return req.prompt
        return fim_text(req.prompt, req.suffix) if req.suffix else EOS + req.prompt

    def _body(self, req: GenRequest, stream: bool) -> dict:
        body = {"model": self.model, "prompt": self.prompt(req), "max_tokens": req.max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "n": req.n, "stream": stream}
        if req.suffix and self.fim == "suffix":
            body["suffix"] = req.suffix
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    def _route(self, req: GenRequest, stream: bool) -> tuple[str, dict]:
        """(URL, JSON body) of the request: /v1/completions, or llama.cpp's /infill for a suffix in infill mode."""
        if not (self.fim == "infill" and req.suffix):
            return self.url, self._body(req, stream)
        if req.n != 1:
            raise BadGenerationRequest(f"n={req.n}: llama.cpp's /infill returns one completion per request "
                                       "(send n=1, or serve this version with fim: template)")
        body = {"input_prefix": req.prompt, "input_suffix": req.suffix, "n_predict": req.max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "stream": stream}
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        return self.infill_url, body

    @staticmethod
    def _infill_finish(data: dict) -> str:
        return "length" if data.get("stop_type") == "limit" else "stop"  # llama.cpp: eos | word | limit

    def complete(self, req: GenRequest) -> Generation:
        import httpx

        url, body = self._route(req, False)
        try:
            r = self.client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {url} unreachable: {exc}") from None
        data = self._check(r)
        if url == self.infill_url:
            return Generation([Choice(data.get("content", ""), self._infill_finish(data),
                                      int(data.get("tokens_predicted", 0)))], int(data.get("tokens_evaluated", 0)))
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        usage = data.get("usage") or {}
        n_comp = int(usage.get("completion_tokens", 0))
        return Generation([Choice(c.get("text", ""), c.get("finish_reason") or "stop", n_comp // max(len(choices), 1))
                           for c in choices], int(usage.get("prompt_tokens", 0)))

    def _raise(self, url: str, status: int, detail: str):
        if status in (401, 403, 404, 405, 407):  # the gateway's URL or key is wrong: not the client's to fix
            raise BackendError(f"upstream {url} refused the gateway ({status}): {detail}; check serve.upstream_url "
                               "(or serve.upstreams) and the upstream's API key")
        if 400 <= status < 500:
            raise BadGenerationRequest(f"upstream rejected the request: {detail}")
        raise BackendError(f"upstream {url} failed with {status}: {detail}")

    def _check(self, r) -> dict:
        if r.status_code >= 400:
            try:
                detail = r.json()["error"]["message"]
            except Exception:
                detail = r.text[:200]
            self._raise(str(r.url), r.status_code, detail)
        return r.json()

    def stream(self, req: GenRequest) -> Stream:
        """Opens the upstream stream before returning, and reads its first event: a request the server refuses
        — by HTTP status, or by an ``error`` event before any text (llama-server reports errors found after it
        accepted a streamed request that way, under a 200) — raises here, so the client gets a clear 4xx/502
        before the first byte instead of a stream that breaks."""
        import httpx

        url, body = self._route(req, True)
        try:
            r = self.client.send(self.client.build_request("POST", url, json=body), stream=True)
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {url} unreachable: {exc}") from None
        try:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            events = self._events(r)
            first = next(events, None)
            if first is not None and first[0] == "error":
                self._raise(url, int(first[1].get("code") or 500), first[1].get("message") or str(first[1]))
        except httpx.HTTPError as exc:
            r.close()
            raise BackendError(f"upstream {url} failed while streaming: {exc}") from None
        except BaseException:
            r.close()
            raise
        return Stream(self._deltas(r, url, first, events))

    @staticmethod
    def _events(r) -> Iterator[tuple[str, dict]]:
        """("data" | "error", payload) for each server-sent event until ``[DONE]`` or the end of the body.

        An error arrives as an ``error:`` event (llama-server) or as a ``data:`` event holding an error object
        instead of choices: ``{"error": {...}}`` (OpenAI, an ownllm gateway) or ``{"object": "error", ...}``
        (vLLM); either is an error, never a chunk with no text."""
        for line in r.iter_lines():
            kind, _, payload = line.partition(":")
            payload = payload.strip()
            if kind not in ("data", "error") or not payload:
                continue
            if payload == "[DONE]":
                return
            data = json.loads(payload)
            if kind == "data" and isinstance(data, dict) and "choices" not in data and (
                    "error" in data or data.get("object") == "error"):
                kind = "error"
            yield kind, (data.get("error", data) if kind == "error" else data)

    def _deltas(self, r, url: str, first, events) -> Iterator[StreamDelta]:
        import httpx

        counts: dict[int, int] = {}
        try:
            if first is None:
                return
            for kind, data in itertools.chain([first], events):
                if kind == "error":  # after text was sent: the stream fails (502 event), the row says so
                    raise BackendError(f"upstream {url} failed mid-stream: {data.get('message') or data}")
                if url == self.infill_url:  # llama.cpp's own format: one object per token, the last has stop
                    fin = self._infill_finish(data) if data.get("stop") else None
                    n_tokens = int(data.get("tokens_predicted", 0)) if fin else 0
                    yield StreamDelta(0, data.get("content", ""), fin, n_tokens)
                    if fin:
                        return
                    continue
                for c in data.get("choices", []):
                    i = int(c.get("index", 0))
                    counts[i] = counts.get(i, 0) + (1 if c.get("text") else 0)
                    fin = c.get("finish_reason")
                    yield StreamDelta(i, c.get("text", ""), fin, counts[i] if fin else 0)
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {url} failed while streaming: {exc}") from None
        finally:
            r.close()
