"""torchrun without its own traceback. When a rank fails, torchrun's main raises ChildFailedError and
Python prints a traceback of torchrun itself under the ranks' messages, burying the one line that says
what happened (a full disk, a bad sample). The ranks have said it and rank 0 has recorded it; here a
failure is one line naming the first failed rank and its exit code. Ranks that stopped after their
checkpoint (PREEMPTED_EXIT) are no failure: torchrun exits with that code and says nothing."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from llava_cluster.noise import quiet
    from llava_cluster.rundir import PREEMPTED_EXIT

    quiet()
    try:
        torchrun()
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        if PREEMPTED_EXIT in codes and codes <= {PREEMPTED_EXIT, -signal.SIGTERM}:  # the rest ended by the agent
            return PREEMPTED_EXIT
        rank, failure = err.get_first_failure()
        print(f"torchrun: {len(err.failures)} rank(s) failed, first rank {rank} with exit code {failure.exitcode}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
