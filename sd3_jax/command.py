"""What every command (``sd3-train``, ``sd3-sample``, ``sd3-convert``, ...) shares: expected
failures end in one line that names the problem, and a non-zero exit.

An expected failure is an error the library raises about its input: a missing path, mismatched
shapes or widths, a bad value (``ValueError``, ``FileNotFoundError``, ...). Its message already
says what is wrong and what to do; a traceback would only hide it. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
import re
from typing import Any, Callable, Sequence

EXPECTED_ERRORS = (
  ValueError,
  FileNotFoundError,
  FileExistsError,
  IsADirectoryError,
  NotADirectoryError,
  PermissionError,
)
EXIT_USAGE = 2  # the exit code of argparse's own usage errors


def config_key_error(error: BaseException, argv: Sequence[str] = ()) -> str:
  """One sentence for ml_collections' error about a config key that does not exist (a typo in
  ``--config.a.b=v`` or in an overrides dict), with its "did you mean" suggestion."""
  text = str(error.args[0]) if error.args else str(error)
  text = text.replace("\\n", "\n").replace("\\'", "'")
  m = re.search(r'Key "([^"]+)" does not exist', text) or re.search(r"^\W*([\w-]+)", text)
  key = m.group(1) if m else "?"
  m = re.search(r'Did you mean "([^"]+)" instead of', text)
  flag = next(
    (a.split("=")[0] for a in argv if a.startswith("--config.") and re.search(rf"\.{re.escape(key)}(\.|=|$)", a)), None
  )
  where = f"{flag}: " if flag else ""
  hint = f'; did you mean "{m.group(1)}"?' if m else " (sd3_jax/config.py lists the keys and what they mean)"
  return f"{where}no such config key {key!r}{hint}"


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


def add_distributed_args(p) -> None:
  """The multi-host flags of the argparse commands (the same as sd3-train's)."""
  g = p.add_argument_group("multi-host (as sd3-train)")
  g.add_argument("--multihost", action="store_true", help="jax.distributed.initialize() (auto-detected cluster)")
  g.add_argument("--coordinator_address", help="host:port of process 0 (with --num_processes, --process_id)")
  g.add_argument("--num_processes", type=int)
  g.add_argument("--process_id", type=int)


def init_distributed(args) -> None:
  """jax.distributed.initialize() as the flags of ``add_distributed_args`` ask."""
  import jax

  if args.coordinator_address:
    if args.num_processes is None or args.process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
    )
  elif args.multihost:
    jax.distributed.initialize()


def parse_absl_flags(prog: str) -> Callable[[list[str]], list[str]]:
  """A ``flags_parser`` for ``absl.app.run``: a bad flag, a missing value or a config override
  that names no config key ends in one line (``prog: error: ...``) and exit code 2, instead of
  absl's "FATAL Flags parsing error" (exit 1) or ml_collections' traceback."""

  def parse(argv: list[str]) -> list[str]:
    from absl import flags

    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      msg = f"{one_line(e)} (--helpfull lists the flags)"
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that does not exist
      msg = config_key_error(e, argv)
    except (ValueError, TypeError) as e:
      msg = one_line(e)
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(EXIT_USAGE)

  return parse
