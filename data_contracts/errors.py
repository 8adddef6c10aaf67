"""The base of every error a user can cause and fix (bad file, bad field, bad budget, bad config).

Tasks do not retry these, and the CLI prints them as one line instead of a traceback.
"""


class UserError(ValueError):
    pass
