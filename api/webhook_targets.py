"""The webhook allow-list on submission: 403 `webhook_not_allowed` before anything is enqueued.

The webhook consumer checks the URL again at send time, against the resolved address it then
connects to (worker/webhooks.py): this check is for a fast, clear answer to the client.
"""

from __future__ import annotations

import asyncio
import socket

from shared.errors import InvalidRequest, WebhookNotAllowed
from shared.models import PredictionRequest
from shared.settings import Settings
from shared.webhooks import TargetRefused, check_addresses, literal_address, match_target

RESOLVE_SECONDS = 2.0


async def check_webhook(request: PredictionRequest, settings: Settings) -> None:
    """403 for a webhook URL the allow-list refuses (off the list, or into a private network)."""
    if request.webhook is None:
        if request.webhook_events is not None:
            raise InvalidRequest("webhook_events: only with webhook (the URL to send them to)")
        return
    try:
        target = match_target(request.webhook, settings.webhook_allowed_origins)
        host = target.parts.hostname
        if target.exact or host is None or literal_address(host) is not None:
            return
        try:
            async with asyncio.timeout(RESOLVE_SECONDS):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, target.parts.port, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError):
            raise InvalidRequest(f"webhook: the host {host} does not resolve") from None
        check_addresses(target, [str(info[4][0]) for info in infos])
    except TargetRefused as refused:
        raise WebhookNotAllowed(str(refused)) from None
