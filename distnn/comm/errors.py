"""Errors that cross ranks: the same exception raised on every rank, and the job-ending hook."""
import sys
import traceback


class RankError(RuntimeError):
    """Ranks disagree (e.g. parameter checksums differ); raised on every rank with the same message."""


def same_kind(info, message) -> BaseException:
    """An exception of the class named in info (as loaded here), else its nearest base, with message."""
    kind = sys.modules.get(info["module"])
    for part in info["name"].split("."):
        kind = getattr(kind, part, None)
    if not (isinstance(kind, type) and issubclass(kind, BaseException)):
        return RankError(message)
    for base in kind.__mro__:  # a constructor that takes more than a message falls back to its base
        try:
            return base(message)
        except Exception:
            continue
    return RankError(message)


def install_excepthook(comm) -> None:
    """Like `python -m mpi4py`: an uncaught exception prints a rank-prefixed traceback and aborts
    the job."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if comm.size == 1:
            return previous(kind, value, tb)
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write("".join(f"[rank {comm.rank}] {line}\n" for line in text.splitlines()))
        comm.abort(1)

    sys.excepthook = hook
