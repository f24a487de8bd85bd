"""The one request type behind every client API.

API shapes (OpenAI's ``/v1/completions``, Tabby's ``segments``, Continue's events) are parsed at the edge into
a :class:`CompletionInput`; routing, logging and the engine see only this, so adding a client API touches the
protocol layer alone (vLLM's entrypoints are layered the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from feedback.backends import Sampling
from feedback.models import Client

CLIENTS = tuple(c.value for c in Client)


@dataclass(frozen=True)
class CompletionInput:
    prefix: str  # the text before the cursor (OpenAI's `prompt`)
    suffix: str | None = None  # the text after it; FIM when set
    model: str = "auto"
    language: str = "unknown"
    client: str = Client.openai.value
    end_user: str | None = None  # the client's own user field, as sent
    filepath: str | None = None
    git_url: str | None = None
    sampling: Sampling = Sampling()  # the engine's own type: limits are checked on it, GenRequest built from it
    stream: bool = False

    def __post_init__(self):
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {self.client!r}")
