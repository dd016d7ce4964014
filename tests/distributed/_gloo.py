"""What every 2-process gloo test worker here shares: a free port and the process group's
lifetime (imported as ``_gloo``: pytest puts this folder on ``sys.path``, and spawned workers
inherit it)."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(
    rank: int, world: int, port: int, timeout_s: float | None = None
) -> Iterator[None]:
    """A gloo group on the loopback for the body of the worker, one torch thread.

    On success: a barrier (no rank tears gloo down while the other still communicates),
    ``destroy_process_group``, then ``os._exit(0)``, which skips C++ static destruction: at
    interpreter exit gloo's background threads were sometimes destroyed while joinable and the
    process aborted ("terminate called without an active exception", SIGABRT) after all its work
    was done and saved — about one full test run in fifteen. A failure is raised as it is, after
    the group is destroyed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **options)
    try:
        yield
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
