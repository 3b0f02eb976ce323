"""The `deepcad-jax` command: a thin layer of absl flags over the public API.

Each command is a `Command` with its flags (on a FlagValues of its own, so `main` can be
called many times in one process) and a `run` function. User mistakes print one line
(`error: ...`) and exit with status 2; no traceback.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import signal
import sys
import threading
import warnings
from typing import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

from deepcad_jax import __version__
from deepcad_jax.cli import analysis, denoise, models, research, train, view
from deepcad_jax.errors import Terminated, UserError

log = logging.getLogger("deepcad_jax")


# The commands, in the order `usage` lists them; each module of this package defines
# (and registers here) the commands of one activity.
ORDER = ("demo", "train", "denoise", "view", "traces", "events", "audit", "calibrate",
         "convert", "export", "stream", "bench", "prune", "ladder", "score", "simulate",
         "evaluate")
COMMANDS = {c.name: c for c in sorted(
    [*train.COMMANDS, *denoise.COMMANDS, *models.COMMANDS, *analysis.COMMANDS,
     *research.COMMANDS, *view.COMMANDS], key=lambda c: ORDER.index(c.name))}


def version() -> str:
  """'deepcad-jax X (jax Y, jaxlib Z, Python P)': what a bug report needs."""
  def installed(name: str) -> str:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "not installed"
  return (f"deepcad-jax {__version__} (jax {installed('jax')}, jaxlib "
          f"{installed('jaxlib')}, Python {platform.python_version()})")


def usage() -> str:
  lines = ["usage: deepcad-jax COMMAND [--flags]", "       deepcad-jax --version", "",
           "commands:"]
  lines += [f"  {c.name:<10} {c.summary}" for c in COMMANDS.values()]
  lines += ["", "'deepcad-jax COMMAND --help' lists a command's flags.", "", "examples:"]
  lines += [f"  {c.example}" for c in COMMANDS.values()]
  return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is at the time (it may be replaced after set-up)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def _setup_logging() -> None:
  # Orbax and grain are chatty, and log failures they also raise (a full disk) with
  # tracebacks, from each of their threads and abandoned asyncio tasks: the command
  # reports the failure in one line.
  absl_logging.set_verbosity(absl_logging.FATAL)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logger = logging.getLogger("deepcad_jax")
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(asctime)s %(message)s",
                                           "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _terminate(signum, frame):
  raise Terminated()


def _raise_on_sigterm() -> Callable[[], None]:
  """SIGTERM unwinds like Ctrl-C (clean-ups run; exit 143); returns what undoes it."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None
  previous = signal.signal(signal.SIGTERM, _terminate)
  return lambda: signal.signal(signal.SIGTERM, previous if previous is not None
                               else signal.SIG_DFL)


def _one_help_section(fv: flags.FlagValues) -> None:
  """--help lists a command's flags under one heading, `deepcad_jax.cli`, whichever
  module of this package defined them (absl groups flags by defining module)."""
  by_module = fv.flags_by_module_dict()
  ours = sorted(m for m in by_module if m.startswith(__package__ + "."))
  merged = [flag for m in ours for flag in by_module.pop(m)]
  if merged:
    by_module.setdefault(__package__, []).extend(merged)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `deepcad-jax` console script; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  if argv[1] in ("--version", "-V", "version"):
    print(version())
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
    return 2
  command = COMMANDS[name]
  fv = flags.FlagValues()
  command.define(fv)
  _one_help_section(fv)
  if any(a in ("-h", "--help", "-help") for a in argv[2:]):
    note = ""
    if command.help_defaults is not None:
      try:
        note = command.help_defaults(fv, argv[2:]) + "\n\n"
      except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"usage: deepcad-jax {name} [--flags]\n\n{command.summary}\n\n"
          f"example: {command.example}\n\n{note}{fv.get_help()}")
    return 0
  try:
    rest = fv([f"deepcad-jax {name}"] + argv[2:])
  except flags.Error as e:
    print(f"error: {e}. See 'deepcad-jax {name} --help'.", file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f"error: unexpected argument(s) {rest[1:]}; every input is a --flag. See "
          f"'deepcad-jax {name} --help'.", file=sys.stderr)
    return 2
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  _setup_logging()
  restore_sigterm = _raise_on_sigterm()
  try:
    return int(command.run(fv) or 0)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Terminated:
    print("terminated (SIGTERM).", file=sys.stderr)
    return 128 + signal.SIGTERM
  except KeyboardInterrupt:
    print("interrupted.", file=sys.stderr)
    return 128 + signal.SIGINT
  finally:
    restore_sigterm()


def _quiet_unraisable(unraisable) -> None:
  """Errors Python can only ignore (callbacks of a library's threads that outlive a
  failure, e.g. Orbax's after a failed save) go to the debug log, not the terminal."""
  log.debug("ignored %s: %s", unraisable.exc_type.__name__, unraisable.exc_value)


def entry() -> None:
  sys.unraisablehook = _quiet_unraisable
  # The coroutines a library abandoned on a failure it raised (Orbax's writers after a
  # failed save) are reported again at exit: the failure has had its sentence.
  warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
  try:
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
      # Stopped by a signal: our files and locks are closed by now, but XLA work still
      # in flight (a compilation, computations dispatched ahead) can crash the
      # interpreter's teardown (a segmentation fault after "interrupted."), so leave
      # without it.
      sys.stdout.flush()
      sys.stderr.flush()
      logging.shutdown()
      os._exit(code)
    sys.exit(code)
  except BrokenPipeError:  # output piped into a command that stopped reading (head)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
