"""ClassifyStream bookkeeping: the wire id of each item, the caller's id it is handed back with, and the order
answers are handed back in."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from resnet_serve.protos import classifier_pb2 as pb

from .errors import ClassifierError
from .images import ImageLike, to_request
from .results import Result, item_of, with_id


def default_id(image: object, index: int) -> str:
    """A stream item's id when the caller gives none: a file's path, else its position in the input."""
    return str(image) if isinstance(image, (str, Path)) else str(index)


class StreamOrder:
    """Stream answers may come out of order. On the wire an item's request_id is its index (short and unique
    whatever the caller's ids are); answers are handed back carrying the caller's id, in request order
    (ordered=True) or as they arrive."""

    def __init__(self, ordered: bool, ids: Iterable[str] | None = None):
        self.ordered = ordered
        self._ids = None if ids is None else iter(ids)
        self.names: dict[int, str] = {}  # index -> caller's id; written by the sender before the item is sent
        self.pending: dict[int, Result | ClassifierError] = {}
        self.next_out = 0

    def request(self, index: int, image: ImageLike, top_k: int) -> pb.ClassifyRequest:
        """The index-th item as a request, noting the id its answer will carry."""
        if self._ids is None:
            name = default_id(image, index)
        else:
            name = next(self._ids, None)
            if name is None:
                raise ValueError(f"fewer request ids than images (none for image {index})")
        request = to_request(image, top_k, str(index))
        self.names[index] = str(name)
        return request

    def add(self, response: pb.ClassifyResponse) -> list[Result | ClassifierError]:
        try:
            index = int(response.request_id)
        except ValueError:  # not an id this client sent (a server that does not echo ids): as it is
            return [item_of(response)]
        item = with_id(item_of(response), self.names.pop(index, response.request_id))
        if not self.ordered:
            return [item]
        self.pending[index] = item
        ready = []
        while self.next_out in self.pending:
            ready.append(self.pending.pop(self.next_out))
            self.next_out += 1
        return ready
