"""daemon.uuids: the batched random UUIDs FreeSWITCH gets for legs, jobs and A's apps."""

from __future__ import annotations

import os
import uuid

from daemon import uuids
from daemon.switch import commands as fs


def test_new_uuid_is_a_random_version_4_uuid_as_uuid4_writes_it() -> None:
    made = [uuids.new_uuid() for _ in range(5 * uuids.BATCH + 3)]  # several batches
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lowercase, hyphenated: what str(uuid4()) gives
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert fs.uuid(text) == text  # what the commands accept as a leg or event UUID
    assert len(set(made)) == len(made)
    # the random bits are not fixed: every hex digit outside the version nibble takes many values
    digits = [{text.replace("-", "")[i] for text in made} for i in range(32)]
    assert all(len(seen) > 3 for i, seen in enumerate(digits) if i != 12)
    assert {text[19] for text in made} == set("89ab")


def test_a_forked_child_does_not_hand_out_the_parents_batch() -> None:
    uuids.new_uuid()  # a batch is ready in the parent
    ahead = list(uuids._ready)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.write(write, uuids.new_uuid().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert uuid.UUID(child).version == 4
    assert child not in ahead
    assert list(uuids._ready) == ahead  # the parent's batch is untouched
