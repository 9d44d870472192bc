"""How ``ddpm-fast`` ends: every failure a user can cause becomes one line, a bug a traceback.

:func:`run_command` runs one command. Errors a user can cause (an option value, a missing or
unreadable file, a destination that cannot be written, a full disk, a busy run folder, a
diverged run, a device out of memory) end as one ``ddpm-fast: error: ...`` line that names the
file or option and what to do, with exit code :data:`EXIT_ERROR`. Any other exception is a bug
of ddpm_fast: its traceback is printed with a line asking for a report (exit code
:data:`EXIT_BUG`). ``--debug`` prints the traceback of every error. Warnings of ddpm_fast
(:class:`Note`) are printed as ``ddpm-fast: note: ...`` lines.
"""

import os
import sys
import traceback
import warnings

EXIT_OK = 0
EXIT_ERROR = 1  # the user's input, files or machine: the message says what to do
EXIT_USAGE = 2  # argparse: an unknown option or an invalid option value
EXIT_BUG = 3  # an unexpected exception: a bug of ddpm_fast
EXIT_INTERRUPTED = 130


class Note(UserWarning):
    """Something the user should know that does not stop the command (shown as one line)."""


def note(message):
    """Emits a :class:`Note` (the command line prints it as ``ddpm-fast: note: ...``)."""
    warnings.warn(message, Note, stacklevel=2)


def user_errors():
    """The exception types whose message is meant for the user, as a tuple."""
    from .backends import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .fileio import OutputError, RunLockedError
    from .interop.diffusers import DiffusersFormatError
    from .train import ConfigError, TrainingDiverged

    return (DataError, CheckpointError, ConfigError, TrainingDiverged, BackendUnavailableError,
            DiffusersFormatError, OutputError, RunLockedError)


def message_for(error):
    """The one-line message for an exception a user can cause, or None for a bug of ours."""
    import torch

    from .fileio import explain_os_error

    if isinstance(error, user_errors()):
        return str(error)
    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return ("the device ran out of memory; use a smaller --batch-size (or --n), a smaller model "
                "(--preset tiny, --ch), or --device cpu")
    if isinstance(error, MemoryError):
        return "out of memory; use a smaller --batch-size (or --n) or a smaller model"
    if isinstance(error, OSError) and getattr(error, "filename", None) is not None:
        return explain_os_error(error, os.fspath(error.filename), verb="use")
    return None


def _prefix():
    rank = os.environ.get("RANK")
    return f"ddpm-fast: error (rank {rank}): " if rank not in (None, "0") else "ddpm-fast: error: "


def _show_note(message, category, filename, lineno, file=None, line=None, _previous=warnings.showwarning):
    if issubclass(category, Note):
        print(f"ddpm-fast: note: {message}", file=sys.stderr, flush=True)
    else:
        _previous(message, category, filename, lineno, file, line)


def run_command(command, debug=False):
    """Runs ``command()`` and returns the exit code; prints one line for a user's error."""
    saved = warnings.showwarning
    warnings.showwarning = _show_note
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", Note)
            command()
        return EXIT_OK
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("ddpm-fast: interrupted (files being written were left as they were before)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - this is the one place that turns exceptions into exit codes
        message = message_for(error)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(_prefix() + " ".join(message.split("\n")), file=sys.stderr)
            return EXIT_ERROR
        if not debug:
            traceback.print_exc()
        print(_prefix() + f"unexpected {type(error).__name__}: this is a bug in ddpm_fast; please report this "
                          f"with the command you ran and the traceback above", file=sys.stderr)
        return EXIT_BUG
    finally:
        warnings.showwarning = saved
