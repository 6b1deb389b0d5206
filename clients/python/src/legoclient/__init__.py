"""The Python client of LegoDiffusion.

- ``LegoClient`` / ``AsyncLegoClient``: the gateway's REST API, sync or asyncio; calls the
  gateway refuses for now (429, 503) or that meet a connection error are tried again
  (``Retry``), honouring Retry-After.
- ``NatsClient``: straight over NATS (asyncio), without the gateway.
- Results are typed (``Generation``, ``Progress``, ``HistoryPage``, ``ErrorInfo``); each
  keeps the JSON it was read from in ``raw``. Every failure is a ``LegoError``.

It needs httpx, nats-py and orjson: none of the service's code, no torch.
"""

from legoclient.errors import LegoError
from legoclient.http import AsyncLegoClient, Event, EventCallback, LegoClient
from legoclient.models import ErrorInfo, Generation, HistoryPage, Progress, Timing
from legoclient.nats_client import NatsClient
from legoclient.retry import Retry
from legoclient.sse import SseParser

__all__ = [
    "AsyncLegoClient", "ErrorInfo", "Event", "EventCallback", "Generation", "HistoryPage",
    "LegoClient", "LegoError", "NatsClient", "Progress", "Retry", "SseParser", "Timing",
]
__version__ = "0.1.0"
