"""The model process, from napari's side: TensorFlow runs in a child process, never in napari's.

TensorFlow's shared library exports its own copy of LLVM's symbols, and Mesa's software
OpenGL (llvmpipe: Xvfb, virtual machines, remote desktops) links LLVM too; in one process
they crash napari's canvas and abort the process at exit (docs/napari.md). So the widget
hands every use of a network (loading, segmenting, fine-tuning) to `ModelProcess`, a
`spawn`ed child (`child.serve`) that holds the loaded model between requests, and gets
numpy arrays and `protocol.ModelInfo` back through a pipe, pickled.

A request is a generator (`ModelProcess.call`), run in napari's worker thread: it yields
the child's progress reports and returns its answer. The child's refusals come back as
one-line `PipelineError`s; `stop` kills the child (the widget's Cancel), and a child that
ends without an answer (killed, out of memory) is one line too. The next request starts a
new child. This module imports no TensorFlow; only the child imports `child`.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Generator
from multiprocessing.connection import Connection
from typing import Any

from pipeline.errors import PipelineError
from pipeline.napari_plugin.protocol import DONE, ERROR, PROGRESS


class ModelProcess:
    """The child process that runs the network for one widget, started on the first request."""

    def __init__(self) -> None:
        self._process: multiprocessing.Process | None = None
        self._connection: Connection | None = None
        self._stopped = False  # the child was killed on purpose (`stop`), not crashed

    def call(self, command: str, *args: Any) -> Generator[Any, None, Any]:
        """Asks the child to run `command` (`child.COMMANDS`) with `args`: yields its progress
        reports, returns its answer; None when `stop` ended it. Raises its refusal, or the
        end of a child that crashed, as a one-line PipelineError."""
        connection = self._started()
        try:
            connection.send((command, args))
            while True:
                kind, value = connection.recv()
                if kind == PROGRESS:
                    yield value
                elif kind == ERROR:
                    raise PipelineError(value)
                else:
                    return value
        except (EOFError, OSError):  # the child ended: its end of the pipe closed
            if self._stopped:
                return None
            raise PipelineError(f"the model process ended without an answer ({self._ended()})") from None

    def stop(self) -> None:
        """Kills the child, if one runs, and waits for its end (so that the kernel has freed its run lock)."""
        process = self._process
        if process is not None and process.is_alive():
            self._stopped = True
            process.kill()
            process.join()

    def _started(self) -> Connection:
        """The pipe to a running child; starts one if there is none (the first request, or after an end)."""
        if self._process is None or not self._process.is_alive():
            if self._connection is not None:
                self._connection.close()
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of napari's Qt state
            self._connection, theirs = context.Pipe()
            # Daemonic: multiprocessing ends it when napari exits; an idle child also ends when the pipe closes.
            self._process = context.Process(target=_serve, args=(theirs,), name="unet-pipeline model", daemon=True)
            self._process.start()
            theirs.close()  # only the child holds its end, so that its death reads as the end of the pipe
            self._stopped = False
        return self._connection

    def _ended(self) -> str:
        """How the child ended, in words."""
        self._process.join()
        code = self._process.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
            return how + (": out of memory?" if -code == signal.SIGKILL else "")
        return f"exit status {code}; its messages are in the terminal napari runs in"


def _serve(connection: Connection) -> None:
    """The child's entry point. `child` (and with it TensorFlow) is imported here, in the child only."""
    from pipeline.napari_plugin import child

    child.serve(connection)
