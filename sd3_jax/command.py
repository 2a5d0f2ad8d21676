"""What every command (``sd3-train``, ``sd3-sample``, ``sd3-convert``, ...) shares: expected
failures end in one line that names the problem, and a non-zero exit.

An expected failure is an error the library raises about its input: a missing path, mismatched
shapes or widths, a bad value (``ValueError``, ``FileNotFoundError``, ...). Its message already
says what is wrong and what to do; a traceback would only hide it. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

EXPECTED_ERRORS = (
  ValueError,
  FileNotFoundError,
  FileExistsError,
  IsADirectoryError,
  NotADirectoryError,
  PermissionError,
)
EXIT_USAGE = 2  # the exit code of argparse's own usage errors


def one_line(error: BaseException) -> str:
  """The error's message on one line."""
  return " ".join(str(error).split()) or type(error).__name__


def run(main: Callable[..., Any], prog: str, *args, **kwargs) -> None:
  """Console entry point body: ``main(*args, **kwargs)``, exiting with ``EXIT_USAGE`` and
  ``prog: error: <message>`` on stderr when it raises an expected error."""
  try:
    main(*args, **kwargs)
  except EXPECTED_ERRORS as e:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
