"""kombu's filesystem transport (the embedded-mode broker), with two fixes.

- Messages are written whole, then renamed into the queue folder. kombu creates the message
  file and then writes it, so a worker polling at that moment could take the file while still
  empty, fail to decode it, and stop ("Unrecoverable error: JSONDecodeError"). A rename is
  atomic: the worker sees nothing, or the complete message.
- A stop request is noticed quickly. Celery's worker loop for polling transports calls
  `drain_events(timeout=2.0)` and looks for a shutdown request between two calls, then drains
  once more: Ctrl-C took up to four seconds to reach an idle worker. Capping each wait keeps
  that well under a second, at no cost: the transport lists its folder every polling interval
  anyway.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

MAX_DRAIN_SECONDS = 0.25


class Channel(filesystem.Channel):
    # kombu's two base classes name the second parameter differently; this follows the nearer.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # The same name kombu gives it (ordered by time; the queue after the first dot).
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # Until renamed it ends in ".tmp", which no queue's pattern matches.
        partial = final + ".tmp"
        try:
            with open(partial, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> Any:
        if timeout is not None:
            timeout = min(timeout, MAX_DRAIN_SECONDS)
        return super().drain_events(connection, timeout=timeout, **kwargs)
