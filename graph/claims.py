"""One render per request id on an ingress replica: a retry (same X-Request-ID, a client whose connection dropped)
of a render still running here waits for it, then is answered from its record. No await between the check and the
claim, so two arrivals of one id cannot both claim it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Claims:
    def __init__(self):
        self._pending: dict[str, asyncio.Future] = {}

    async def claim(self, rid: str, recorded: Callable[[], Awaitable[Any]]) -> tuple[Any, asyncio.Future | None]:
        """(the recorded answer, None) for an id already rendered, else (None, a claim on the id)."""
        while True:
            while (pending := self._pending.get(rid)) is not None:
                await asyncio.shield(pending)
            stored = await recorded()
            if stored is not None:
                return stored, None
            if rid not in self._pending:
                claim = asyncio.get_running_loop().create_future()
                self._pending[rid] = claim
                return None, claim

    def release(self, rid: str, claim: asyncio.Future | None) -> None:
        """Wake the retries waiting on this id: its record is committed by now (or the render failed)."""
        if claim is not None and self._pending.get(rid) is claim:
            del self._pending[rid]
            claim.set_result(None)

    def __contains__(self, rid: str) -> bool:
        return rid in self._pending
