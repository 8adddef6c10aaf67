"""The two kinds of error the CLI prints as one line instead of a traceback.

`UserError`: a mistake a user can fix (bad file, bad field, bad budget, bad config); exit status 2.
`DependencyError`: a service the run needs stayed unreachable through its retry budget (the artifact store's
endpoint); not bad input, so not a UserError; exit status 1.

Tasks retry neither: a bad file fails the same way every time, and a dependency error already spent its budget.
"""


class UserError(ValueError):
    pass


class DependencyError(RuntimeError):
    pass
