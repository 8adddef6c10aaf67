"""The two kinds of error the CLI prints as one line instead of a traceback.

`UserError`: a mistake a user can fix (bad file, bad field, bad budget, bad config); exit status 2.
`DependencyError`: a service the run needs stayed unreachable through its retry budget (the artifact store's
endpoint); not bad input, so not a UserError; exit status 1.

A full disk (ENOSPC, EDQUOT) is neither class (it is an OSError raised deep inside a write) but is treated like
a DependencyError: one line, exit status 1, never retried by a task (the disk stays full on the retry).

Tasks retry neither: a bad file fails the same way every time, and a dependency error already spent its budget.
"""
import errno

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class UserError(ValueError):
    pass


class DependencyError(RuntimeError):
    pass


def chain(exc: BaseException | None):
    """An error, then the one it was raised from (or while handling), and so on, each once: Prefect, fsspec and
    MLflow re-raise their own errors around the one that says what happened."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException | None) -> bool:
    """A write failed because the disk (or the user's quota) is full: the environment, not the input, not a bug."""
    return any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in chain(exc))
