"""Long work off the viewer's thread: napari generator workers that can be cancelled
(`quit`) and whose failures become one notification (one sentence), never a crash.

The work is a generator: each `yield` hands a value to the viewer's thread and is where
a cancel takes effect. A `UserError` shows its sentence; any other exception shows its
type and message in one line (the viewer goes on).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info

from deepcad_jax.errors import UserError

log = logging.getLogger("deepcad_jax")


class Failed:
  """What a guarded generator returns when its work raised: the sentence to show."""

  def __init__(self, message: str):
    self.message = message

  def __repr__(self) -> str:
    return f"Failed({self.message!r})"


def sentence(error: BaseException, what: str) -> str:
  """A `UserError`'s own sentence; otherwise '<what> failed: <Type>: <message>.'"""
  if isinstance(error, UserError):
    return str(error)
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{what} failed: {type(error).__name__}" + (f": {text}" if text else "") + "."


def guarded(what: str, work: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
  """`work` whose exceptions end it with a `Failed` return value (logged, not raised)."""
  @functools.wraps(work)
  def run(*args, **kwargs):
    try:
      return (yield from work(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - the viewer shows any failure as one sentence
      log.debug("%s failed", what, exc_info=True)
      return Failed(sentence(e, what))
  return run


def notify_error(message: str) -> None:
  """One error notification in the viewer."""
  show_error(message)


def notify(message: str) -> None:
  """One information notification in the viewer."""
  show_info(message)


def start(what: str, work: Callable[..., Iterator[Any]], *args: Any,
          on_yield: Callable[[Any], None] | None = None,
          on_done: Callable[[Any], None] | None = None,
          on_finish: Callable[[], None] | None = None,
          on_failed: Callable[[str], None] | None = None, **kwargs: Any) -> GeneratorWorker:
  """Run the generator `work(*args, **kwargs)` in a napari thread worker.

  Args:
    what: the work's name in a failure's sentence ('training', 'denoising').
    work: a generator function; its yields go to `on_yield` on the viewer's thread.
    on_yield: called with each yielded value.
    on_done: called with the return value when the work completed (not on failure or
      cancel).
    on_finish: called last in every case (completed, failed or cancelled).
    on_failed: called with the sentence shown when the work failed.
  """
  worker = create_worker(guarded(what, work), *args, _start_thread=False, **kwargs)
  if on_yield is not None:
    def yielded(value: Any) -> None:
      try:
        on_yield(value)
      except Exception as e:  # noqa: BLE001 - showing progress must not crash the viewer
        worker.quit()
        notify_error(sentence(e, what))
    worker.yielded.connect(yielded)

  def returned(value: Any) -> None:
    if isinstance(value, Failed):
      notify_error(value.message)
      if on_failed is not None:
        on_failed(value.message)
    elif on_done is not None:
      try:
        on_done(value)
      except Exception as e:  # noqa: BLE001 - showing a result must not crash the viewer
        notify_error(sentence(e, what))

  worker.returned.connect(returned)
  if on_finish is not None:
    worker.finished.connect(on_finish)
  worker.start()
  return worker
