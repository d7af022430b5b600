"""What a replica starting late must replay: the net adapter loads and unloads of the cluster."""

from __future__ import annotations

import json

from server.cluster.asgi import ForwardedRequest

LOAD_PATH = "/v1/load_lora_adapter"


class AdapterLog:
    """The last admin call (load or unload) every replica applied, per adapter name, in order.

    An unload after a runtime load leaves nothing to replay, so churn does not grow the log."""

    def __init__(self) -> None:
        self.calls: dict[str, ForwardedRequest] = {}

    def record(self, call: ForwardedRequest) -> None:
        """Note an admin call every replica accepted."""
        name = str(json.loads(call.body)["lora_name"])
        previous = self.calls.pop(name, None)
        if call.path != LOAD_PATH and previous is not None and previous.path == LOAD_PATH:
            return
        self.calls[name] = call

    def replay(self) -> list[ForwardedRequest]:
        """The calls to apply, oldest first."""
        return list(self.calls.values())
