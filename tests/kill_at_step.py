"""train.py whose rank $KILL_RANK kills itself with SIGKILL when it has recorded $KILL_AT_STEP steps, on the
first attempt only (torchrun's restart count 0): a node lost mid-epoch, for the restart tests."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import monitor  # noqa: E402
import train  # noqa: E402

record = monitor.Run.record


def record_then_die(self, *args):
    record(self, *args)
    if (self.steps_here == int(os.environ["KILL_AT_STEP"]) and os.environ["RANK"] == os.environ["KILL_RANK"]
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    monitor.Run.record = record_then_die
    sys.exit(train.main())
