"""The one exception type commands turn into a clean message and exit code 2, and the guard that does it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user: a wrong path, value or file. Reported without a traceback."""


def run_command(prog: str, body: Callable[[], int | None], cleanup: Callable[[], None] | None = None) -> NoReturn:
    """Run a command and exit with its status: the one place where errors become exit codes.

    A UserError, or an OSError (a full disk, a permission, a path that is a file), becomes one line
    `prog: error: ...` on stderr and exit 2; Ctrl-C outside a training loop (which saves and stops on its
    own) becomes `prog: interrupted` and exit 130. `cleanup` runs on every way out.
    """
    try:
        code = body() or 0
    except UserError as e:
        code = _fail(prog, str(e))
    except OSError as e:
        code = _fail(prog, f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        if cleanup is not None:
            cleanup()
    sys.exit(code)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2
