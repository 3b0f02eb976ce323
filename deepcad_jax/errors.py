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


SEED_MAX = 2**32 - 1  # the largest seed every random generator of the package takes


def check_number(name: str, value, *, at_least: float | None = None,
                 above: float | None = None, at_most: float | None = None,
                 below: float | None = None, whole: bool = False, fix: str = "") -> None:
  """Refuse, in one sentence, a number that is NaN, infinite or out of its range.

  Every number a user gives (a flag, a config field, an argument of the public API)
  is checked here, so that the sentence reads the same everywhere:
  '--rate must be a finite number of at least 0; got -1.'

  Args:
    name: what the user calls it (a flag such as '--rate').
    value: the number (None passes: a default applies).
    at_least, above, at_most, below: the bounds, inclusive or not.
    whole: it must be an integer.
    fix: an optional last clause (after a semicolon).
  """
  if value is None:
    return
  def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"

  bounds = []
  if at_least is not None:
    bounds.append(f"at least {_fmt(at_least)}")
  if above is not None:
    bounds.append(f"above {_fmt(above)}")
  if at_most is not None:
    bounds.append(f"at most {_fmt(at_most)}")
  if below is not None:
    bounds.append(f"below {_fmt(below)}")
  try:
    number = float(value)
  except (TypeError, ValueError, OverflowError):
    number = float("nan")
  ok = number == number and abs(number) != float("inf")
  ok = ok and (not whole or number == int(number))
  ok = ok and (at_least is None or number >= at_least) and (
      above is None or number > above) and (at_most is None or number <= at_most) and (
      below is None or number < below)
  if not ok:
    what = "a whole number" if whole else "a finite number"
    raise UserError(f"{name} must be {what}{' ' + ' and '.join(bounds) if bounds else ''}"
                    f"; got {value}{'; ' + fix if fix else ''}.")


def check_seed(name: str, value) -> None:
  """A random seed: a whole number from 0 to 2^32 - 1."""
  check_number(name, value, at_least=0, at_most=SEED_MAX, whole=True)
