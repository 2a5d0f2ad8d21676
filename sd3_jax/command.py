"""What every command (``sd3-train``, ``sd3-sample``, ``sd3-convert``, ...) shares: expected
failures end in one line that names the problem, and a non-zero exit; Ctrl-C ends in one line
that says what was kept; flags are never abbreviated.

An expected failure is an error the library raises about its input: a missing path, mismatched
shapes or widths, a bad value (``ValueError``, ``FileNotFoundError``, ...). Its message already
says what is wrong and what to do; a traceback would only hide it. Anything else is a bug and
keeps its traceback.

Exit codes of every command: 0 done; 2 bad input (``EXIT_USAGE``); 130 stopped by Ctrl-C
(``EXIT_INTERRUPTED``, after keeping what the command could keep). ``sd3-train`` adds 3 (NaN/Inf)
and 42 (preempted).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
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
# 128 + SIGINT, what a shell reports for Ctrl-C: the user stopped the command. Neither a failure
# (2, 3) nor a preemption (42): a restart loop should not start the command again.
EXIT_INTERRUPTED = 130


class Stopped(Exception):
  """The command stopped because it was asked to (Ctrl-C, SIGTERM) after keeping its work; the
  message says what was kept and how to go on. ``run`` prints it as one line and exits with
  ``exit_code``."""

  exit_code = EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
  """argparse as every command uses it: a flag is never abbreviated (``--step 10`` is an error,
  not ``--steps 10``), and a usage error is one line, ``prog: error: ...``, exit code 2, without
  the usage block (``--help`` shows it)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (--help lists the flags)\n")


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


def run(main: Callable[..., Any], prog: str, *args, on_interrupt: str = "nothing was written", **kwargs) -> None:
  """Console entry point body: ``main(*args, **kwargs)``, exiting with ``EXIT_USAGE`` and
  ``prog: error: <message>`` on stderr when it raises an expected error; with the ``Stopped``
  error's code and message when the command stopped on request (a training loop that saved its
  step); and with ``EXIT_INTERRUPTED`` and ``prog: interrupted (Ctrl-C): <on_interrupt>`` on a
  Ctrl-C anywhere else (``on_interrupt`` says what is kept and how to go on). INFO log lines go
  to stderr (``configure_logging``)."""
  configure_logging()
  try:
    main(*args, **kwargs)
  except EXPECTED_ERRORS as e:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except Stopped as e:
    print(f"{prog}: {one_line(e)}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted (Ctrl-C): {on_interrupt}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def configure_logging() -> None:
  """INFO log lines on stderr for an argparse command. ``force``: importing orbax already logged
  through absl, which gave the root logger a WARNING-level handler, so a plain ``basicConfig``
  would do nothing and every INFO line would be lost. absl's (orbax's per-save) chatter stays
  at WARNING."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)


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


def parse_absl_flags(prog: str, doc: str | None = None) -> Callable[[list[str]], list[str]]:
  """A ``flags_parser`` for ``absl.app.run``: a bad flag, a missing value or a config override
  that names no config key ends in one line (``prog: error: ...``) and exit code 2, instead of
  absl's "FATAL Flags parsing error" (exit 1) or ml_collections' traceback.

  ``--help`` (``-h``, ``--helpshort``) prints ``doc`` (default: the calling module's docstring)
  and the flags of the calling module and
  exits 0, whether the command runs as a console script or as ``python -m``: absl's own help
  looks the flags up by ``sys.argv[0]``, which finds none under a console script's name, and
  exits 1. ``--helpfull`` adds every library's flags, also with exit 0."""
  caller = sys._getframe(1).f_globals.get("__name__")
  doc = (sys._getframe(1).f_globals.get("__doc__") if doc is None else doc) or ""
  # absl and ml_collections register a module's flags under this name (argv[0] for __main__)
  module = sys.argv[0] if caller == "__main__" else caller

  def parse(argv: list[str]) -> list[str]:
    from absl import flags

    asked = {a.split("=")[0] for a in argv[1:]}
    if asked & {"--help", "-h", "--helpshort", "-?", "--helpfull"}:
      if "--helpfull" in asked:
        text = flags.FLAGS.get_help()
      else:  # the calling module's flags without absl's "module:" header (a path under python -m)
        lines = flags.FLAGS.module_help(module).strip("\n").splitlines()
        text = "\n".join(lines[1:]) + "\n  --helpfull: also the flags of the libraries (absl, jax)"
      print(f"{doc.strip()}\n\nflags:\n{text}".lstrip())
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      msg = f"{one_line(e)} (--help lists the flags)"
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that does not exist
      msg = config_key_error(e, argv)
    except (ValueError, TypeError) as e:
      msg = one_line(e)
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(EXIT_USAGE)

  return parse
