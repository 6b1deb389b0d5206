"""Server-Sent Events, read line by line as a browser's EventSource reads them."""

from __future__ import annotations

from typing import Any

import orjson


class SseParser:
    """``feed`` each line of a text/event-stream (without its line break): it returns
    (event, JSON data) when a blank line ends an event, else None."""

    def __init__(self) -> None:
        self.event: str = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, Any] | None:
        if not line:  # a blank line ends an event
            found = (self.event, orjson.loads("\n".join(self.data))) if self.data else None
            self.event, self.data = "message", []
            return found
        if not line.startswith(":"):  # ":" starts a comment (the keep-alive ping)
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self.event = value
            elif name == "data":
                self.data.append(value)
        return None
