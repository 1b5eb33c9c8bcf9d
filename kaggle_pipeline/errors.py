"""The one base class of the errors a user can fix: a bad config, file, row or checkpoint.

Every command prints such an error as one line naming the key, file, row or field, and exits 2
(`cli.run_command`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot be used as it is; the message says where and why."""
