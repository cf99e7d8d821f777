"""Request ids: version-4 UUIDs in hex, unique, from entropy drawn in blocks."""

from __future__ import annotations

import os
import uuid
from unittest import mock

from common import logcontext
from common.logcontext import request_id_new


def test_request_ids_are_version_4_uuids_in_hex_and_unique():
    ids = [request_id_new() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == value  # 32 lower-case hex digits, as uuid4().hex


def test_request_ids_do_not_ask_the_kernel_for_entropy_on_every_call():
    with mock.patch.object(logcontext.os, "urandom", wraps=os.urandom) as urandom:
        for _ in range(1000):
            request_id_new()
    # 1000 ids are 16,000 bytes: a handful of 4 KiB draws, not a thousand system calls.
    assert 1 <= urandom.call_count <= 5, urandom.call_count


def test_a_forked_child_does_not_repeat_the_ids_its_parent_holds():
    request_id_new()  # the parent now holds a block of entropy
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id, then out at once
        os.write(write_end, request_id_new().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    os.close(write_end)
    assert len(child) == 32
    assert child != request_id_new()  # the parent's next id, from the same block
