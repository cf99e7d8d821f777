"""The embedded broker (kombu's filesystem transport, llmrotate_site/broker.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from kombu import Connection, Queue

QUEUE = Queue("broker-test", routing_key="broker-test")


def connection(folder: Path) -> Connection:
    for name in ("queue", "processed", "control"):
        (folder / name).mkdir(exist_ok=True)
    return Connection(
        "filesystem://localhost/",
        transport="llmrotate_site.broker:Transport",
        transport_options={
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.01,
        },
    )


def test_a_consumer_racing_producers_only_ever_sees_whole_messages(tmp_path: Path):
    received: list[dict[str, int]] = []
    errors: list[Exception] = []

    def produce(offset: int) -> None:
        with connection(tmp_path) as conn:
            producer = conn.Producer(serializer="json")
            for i in range(200):
                producer.publish({"i": offset + i, "pad": "x" * 2000}, routing_key="broker-test",
                                 declare=[QUEUE])  # fmt: skip

    def consume() -> None:
        with connection(tmp_path) as conn:
            channel = conn.channel()
            deadline = time.monotonic() + 20
            while len(received) < 400 and time.monotonic() < deadline:
                try:
                    message = channel.basic_get("broker-test")
                except Exception as exc:  # an unreadable (half-written) message
                    errors.append(exc)
                    return
                if message is not None:
                    received.append(message.decode())
                    message.ack()

    threads = [threading.Thread(target=produce, args=(n * 1000,)) for n in range(2)]
    threads.append(threading.Thread(target=consume))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(m["i"] for m in received) == [*range(200), *range(1000, 1200)]


def test_an_idle_worker_loop_notices_a_stop_within_a_fraction_of_a_second(tmp_path: Path):
    with connection(tmp_path) as conn:
        conn.default_channel.queue_declare("broker-test")
        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=2.0)  # what Celery's loop asks for
        assert time.monotonic() - t0 < 1.0
