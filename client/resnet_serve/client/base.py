"""ClientBase: the settings and per-call details ClassifierClient (threads) and AsyncClassifierClient (asyncio)
share; the two differ only in how they wait."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .channel import ChannelOptions, target_string
from .retry import RetryPolicy


class ClientBase:
    """Settings and per-call details common to ClassifierClient and AsyncClassifierClient."""

    def __init__(self, target: str | Sequence[str], options: ChannelOptions | None = None,
                 retry: RetryPolicy | None = None, timeout: float | None = 30.0):
        self.options = options or ChannelOptions()
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.target = target_string(target)
        self._ids = itertools.count()

    def call_metadata(self, metadata: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
        """The options' metadata (e.g. the bearer token), then the call's own."""
        return [*self.options.metadata, *(metadata or ())]

    def call_timeout(self, timeout: float | None) -> float | None:
        """The call's timeout, else the client's."""
        return self.timeout if timeout is None else timeout

    def next_request_id(self) -> str:
        """A unary call's request_id: unique per client."""
        return str(next(self._ids))
