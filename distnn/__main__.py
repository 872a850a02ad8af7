"""`python -m distnn ...` and the `distnn` command (see cli.py); `mpiexec -n 2 python -m distnn
train CFG` too."""
import signal
import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["train"]:
        # Hold SIGTERM/SIGINT from the first line: one that comes during the imports then waits
        # for train's handlers (StopRequest.install unblocks it) instead of killing this rank
        # before it can agree on stopping with the others
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT))
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
