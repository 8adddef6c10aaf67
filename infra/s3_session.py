"""The HTTP session under every S3 request of the store: aiobotocore's, with a deadline on each request.

aiohttp arms no timer while an upload waits for `100 Continue` (botocore asks for it on every PutObject) nor
while a body waits for the server to take it; the read timeout only starts once the body is sent. So an S3
server that accepts the connection and then stalls hung such a request forever: the retry budget never got the
failure it counts (CI caught a `sftcurate run` hung for minutes on a stalled PUT). botocore's own synchronous
client waits one second for `100 Continue`; here a request gets, in all, its longest single wait (the connect or
the read timeout, which `S3Settings.request_config` already cut to what is left of the budget) plus the time
its body takes at the slowest rate we still call alive. A download's body is read after `send` returns, under
the read timeout, which restarts with every chunk.
"""
from __future__ import annotations

import asyncio

from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import ReadTimeoutError

SLOWEST_BYTES_PER_SECOND = 1 << 20  # an upload slower than 1 MiB/s counts as stalled


def body_bytes(request) -> int:
    try:
        return int(request.headers.get("Content-Length") or 0)
    except (TypeError, ValueError):
        return 0


class DeadlineSession(AIOHTTPSession):
    async def send(self, request):
        timeout = self._timeout
        deadline = max(timeout.sock_connect or 0.0, timeout.sock_read or 0.0) or None
        if deadline is not None:
            deadline += body_bytes(request) / SLOWEST_BYTES_PER_SECOND
        try:
            return await asyncio.wait_for(super().send(request), deadline)
        except asyncio.TimeoutError as exc:  # wait_for's own: the base class turns aiohttp's into botocore errors
            raise ReadTimeoutError(endpoint_url=request.url, error=exc) from None
