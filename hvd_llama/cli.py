"""The shell every hvd_llama command runs in (each is also a console script, see setup.cfg).

    python -m hvd_llama.train | prepare | data | export | convert | generate | plot | bench

Each command gives `main` an argparse parser and a body. The shell adds `--debug`, keeps
TensorFlow's start-up lines off the terminal, and turns a UserError (and argparse's own
errors) into one line, `error: ...` (`error (rank R): ...` once Horovod runs more than one
process), with exit status 2; `--debug` shows the traceback instead. A failed collective
(RanksLost: another rank died) is one line with status 1, Ctrl-C `interrupted` with 130.
Anything else is a bug and keeps its traceback. `--help` prints to stdout and exits 0.
"""

import argparse
import os
import sys

from hvd_llama.errors import RanksLost, UserError


def main(parser, body, argv=None):
    """Parse argv with `parser`, run body(args); the process's exit status."""
    parser.add_argument("--debug", action="store_true", help="full tracebacks on bad input")
    for each in _parsers(parser):
        each.error = _one_line_error
    # Options and `section.key=value` overrides in any order (argparse's intermixed parsing
    # cannot take subcommands, which keep the plain one).
    parse = parser.parse_args if parser._subparsers else parser.parse_intermixed_args
    args = parse(argv)
    # Before TensorFlow is imported: its C++ INFO and WARNING lines are for its developers.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return body(args) or 0
    except (UserError, RanksLost) as e:
        if args.debug:
            raise
        print(f"error{_rank()}: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:  # a second Ctrl-C in training, the first anywhere else
        if args.debug:
            raise
        print(f"interrupted{_rank()}", file=sys.stderr, flush=True)
        return 130


def _parsers(parser):
    """The parser and its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _one_line_error(message):
    """argparse's errors (a bad option or value) as one line, exit status 2, like ours."""
    print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
    sys.exit(2)


def at_least(low, kind=int):
    """An argparse type: a number of `kind` that is >= low."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def _rank():
    """" (rank R)" once Horovod runs several processes. Errors before it starts (config, launch)
    read the same on every rank and name none."""
    dist = sys.modules.get("hvd_llama.distributed")
    return f" (rank {dist.rank()})" if dist and dist.size() > 1 else ""


def import_tensorflow():
    """Import TensorFlow and let it find its devices with stderr closed.

    TensorFlow prints lines there before absl's logging starts, whatever TF_CPP_MIN_LOG_LEVEL
    says: oneDNN's notice on CPUs with AVX-512 ("... floating-point round-off errors ..."), and
    CUDA's stubs on hosts without a GPU ("failed call to cuInit ... ERROR"). None is ours to
    show; a failed import still raises (and prints) after stderr is back."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    # TensorFlow reads it once, at import, which for `python -m hvd_llama.export` is before main.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow as tf
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    return tf
