"""AsyncQMPClient's deadlines share one loop timer: each wait still ends at
its own deadline, whichever order they were started in."""

from __future__ import annotations

import asyncio

import pytest
from conftest import RawQemu, run_async

from vmpilot.errors import Timeout
from vmpilot.qmp import AsyncQMPClient

SLACK = 1.0


def test_each_wait_ends_at_its_own_deadline(raw_qemu: RawQemu) -> None:
    async def main() -> None:
        async with AsyncQMPClient.connect(raw_qemu.take_socket()) as qmp:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            ended: dict[str, float] = {}

            async def wait(name: str, timeout: float) -> None:
                with pytest.raises(Timeout, match=name):
                    await qmp.wait_event(name, timeout=timeout)
                ended[name] = loop.time() - t0

            # the later deadline first: the earlier one must re-arm the timer
            await asyncio.gather(wait("LATE", 1.2), wait("EARLY", 0.3), wait("NEVER", 0.3))
            assert 0.3 <= ended["EARLY"] < 0.3 + SLACK
            assert 0.3 <= ended["NEVER"] < 0.3 + SLACK
            assert 1.2 <= ended["LATE"] < 1.2 + SLACK
            assert ended["EARLY"] < ended["LATE"]
            assert await qmp.execute("query-name") == {}  # event waits do not break it

    run_async(main())
