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

    def _metadata(self, metadata: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
        return [*self.options.metadata, *(metadata or ())]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _next_id(self) -> str:
        return str(next(self._ids))
