"""The base of errors a user fixes by changing an input (a path, a checkpoint, a cache).

launch.py prints these as `launch.py: error: ...` with exit status 2 and no traceback, like
config errors; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """An input problem whose message names the problem and the fix."""
