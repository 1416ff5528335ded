"""Processes started by ``torchrun`` that share one piece of work, and fail together.

:func:`join_process_group` joins the process group that ``torchrun`` describes in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` or a rendezvous), or
stands for a single process when there is none. The processes only exchange small status
messages (:meth:`ProcessGroup.exchange`): every step of a shared piece of work ends with every
rank telling the others whether it succeeded, so one rank's failure stops all of them with a
message naming that rank, its host and its error. The messages go over gloo, on CPUs and GPUs
alike: they are a few hundred bytes, gloo honours the group's time-out on every exchange, and a
dead peer's closed connection is noticed at once; the work's data travels through files.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from closedloop.core.validation import check_number

__all__ = ["ProcessGroup", "RankFailedError", "join_process_group"]


class RankFailedError(RuntimeError):
    """Another rank of the process group failed, died, or did not answer within the time-out."""


@dataclass
class ProcessGroup:
    """This process's place among the ranks of a ``torchrun`` job (rank 0 of 1 when alone).

    ``rank``: 0..world_size−1; ``local_rank``: its index on its own machine (which GPU it uses);
    ``timeout_s``: how long an exchange waits for the slowest rank, in seconds; ``steps``: the
    labels of the exchanges done so far, in order; ``failed``: an exchange has reported a failure
    (every rank knows it and stops).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 3600.0
    steps: list[str] = field(default_factory=list)
    failed: bool = False

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Run the block as one step of the shared work, then :meth:`exchange` its outcome under
        ``label``: an exception in the block on any rank stops every rank."""
        try:
            yield
        except Exception as error:
            self.exchange(label, error=error)  # raises it here, and RankFailedError on the other ranks
        else:
            self.exchange(label)

    def exchange(self, label: str, value=None, error: BaseException | None = None) -> list:
        """Every rank's ``value`` (a small picklable object), indexed by rank; every rank must call it
        with the same ``label`` at the same step of the work.

        A rank that failed passes its ``error``: after the exchange it raises that error itself and
        every other rank raises :class:`RankFailedError` naming it. A rank that died, or an
        exchange that waited ``timeout_s``, also raises :class:`RankFailedError`. Alone, it returns
        ``[value]`` (or raises ``error``).
        """
        self.steps.append(label)
        self.failed = self.failed or error is not None
        if self.world_size == 1:
            if error is not None:
                raise error
            return [value]
        import torch.distributed as dist

        entry = (socket.gethostname(), label, None if error is None else f"{type(error).__name__}: {error}", value)
        gathered = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, entry)
        except RuntimeError as failure:  # gloo: a peer's connection closed, or the time-out passed
            self.failed = True
            raise RankFailedError(
                f"rank {self.rank} of {self.world_size} on {socket.gethostname()}: not every rank reached {label!r} "
                f"within {self.timeout_s:g} s, or one stopped ({' '.join(str(failure).split())[:300]}); "
                "see the other ranks' output for the cause"
            ) from failure
        if error is not None:
            raise error
        for rank, (host, their_label, their_error, _) in enumerate(gathered):
            if their_error is not None or their_label != label:
                self.failed = True
            if their_error is not None:
                raise RankFailedError(f"rank {rank} of {self.world_size} on {host} failed at {label!r}: {their_error}")
            if their_label != label:
                raise RankFailedError(
                    f"ranks out of step: rank {self.rank} is at {label!r} but rank {rank} on {host} at {their_label!r}"
                )
        return [value for *_, value in gathered]


@contextmanager
def join_process_group(timeout_s: float = 3600.0) -> Iterator[ProcessGroup]:
    """Join the ``torchrun`` process group of this process for the duration (gloo), or stand alone.

    ``timeout_s``: how long any exchange waits for the slowest rank, in seconds (> 0). Without
    ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is joined and the group is rank 0 of 1.
    """
    timeout_s = check_number("timeout_s", timeout_s, minimum=0.0, inclusive=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield ProcessGroup(timeout_s=timeout_s)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")), timeout_s=timeout_s)
    finally:
        dist.destroy_process_group()
