"""The one exception type for user mistakes.

Anything the user can fix (a wrong path, a 2-D image, a patch that does not fit) raises
`UserError` with one sentence naming the file, the shape and the fix. The CLI prints it
without a traceback; library callers can catch it like any `ValueError`.
"""


class UserError(ValueError):
  """A problem with the user's input, explained in one sentence."""


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that clean-ups run.

  The CLI turns SIGTERM into this exception (exit status 143); code that cleans up on
  KeyboardInterrupt or BaseException cleans up on it too.
  """
