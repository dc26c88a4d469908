"""The request ids in flight on one server, so that no caller can touch another's request.

A Generate call holds its `request_id` for as long as it runs; a second call with the same id
while the first is in flight is refused with ALREADY_EXISTS (`AlreadyExistsError`), before it
reaches the engine. Otherwise the second caller's cancel would abort the first caller's request
in the engine, which knows requests by id alone (docs/errors.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from omnistage.errors import AlreadyExistsError, echo


class InflightRequestIds:
    """The ids of the Generate calls running on one server (`where` names it in messages)."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._ids: set[str] = set()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @contextlib.contextmanager
    def hold(self, request_id: str) -> Iterator[None]:
        """Hold `request_id` for the body; `AlreadyExistsError` when another call holds it."""
        if request_id in self._ids:
            raise AlreadyExistsError(
                f"request_id {echo(request_id)} is already in flight on {self._where}; give "
                "each request its own id (an empty request_id makes the server pick one)"
            )
        self._ids.add(request_id)
        try:
            yield
        finally:
            self._ids.discard(request_id)
