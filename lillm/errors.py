"""The one exception type commands turn into a clean message and exit code 2, and the guard that does it."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user: a wrong path, value or file. Reported without a traceback."""


class PeerRefusal(UserError):
    """This rank's part in a refusal that another rank of the job reports (rank 0's, found in a collective
    check): a later rank of a machine holds back as for any refusal, then exits with status 2 without a word,
    so the refusal shows once whatever the timing; the first rank of another machine says it, pointing at rank
    0's error."""


class JobEnding(Exception):
    """This rank stops because another process of the job ended it (a peer closed its connection in a
    collective): the reason is that process's to report, so this one exits with status 1 and says nothing."""


def run_command(prog: str, body: Callable[[], int | None], cleanup: Callable[[], None] | None = None) -> NoReturn:
    """Run a command and exit with its status: the one place where errors become exit codes.

    A UserError, or an OSError (a full disk, a permission, a path that is a file), becomes one line
    `prog: error: ...` on stderr and exit 2; Ctrl-C outside a training loop (which saves and stops on its
    own) becomes `prog: interrupted` and exit 130. `cleanup` runs on every way out.
    """
    try:
        code = body() or 0
    except UserError as e:
        code = _fail(prog, str(e), peer=isinstance(e, PeerRefusal))
    except JobEnding:
        code = 1
    except OSError as e:
        code = _fail(prog, f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        code = _say_interrupted(prog)
    finally:
        if cleanup is not None:
            cleanup()
    sys.exit(code)


def interrupted(prog: str) -> NoReturn:
    """Ctrl-C before a command's own handling begins (while Python loads torch and DeepSpeed): the same line
    and exit code as `run_command` gives, instead of a KeyboardInterrupt traceback from an import."""
    sys.exit(_say_interrupted(prog))


def _say_interrupted(prog: str) -> int:
    """`prog: interrupted` and 130. Ctrl-C reaches every rank of a launch at once: the machine's first says it."""
    if not _later_local_rank():
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return 130


def _fail(prog: str, message: str, peer: bool = False) -> int:
    if _later_local_rank():
        _let_the_launcher_stop_this_rank()  # rank 0 says it meanwhile
        if peer:
            return 2
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


# How long a later rank holds its refusal back: DeepSpeed's launcher polls its ranks every second and stops the
# rest as soon as one exits with an error; torchrun's agent is faster.
HOLD_BACK_S = 3.0


def _later_local_rank() -> bool:
    """A launched rank other than its machine's first (LOCAL_RANK > 0)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0")) > 0
    except ValueError:
        return False


def _let_the_launcher_stop_this_rank() -> None:
    """Every rank of a launch refuses the same bad input, and each would print the same line. A later rank
    waits a moment first, with the default signal handlers back: once the first rank's refusal has ended it,
    the launcher stops this one before it prints, so a refusal shows once. A refusal of this rank alone (a
    file missing on one machine) is still printed, a few seconds later."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    time.sleep(HOLD_BACK_S)
