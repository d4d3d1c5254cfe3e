"""The shell every hvd_llama command runs in (each is also a console script, see setup.cfg).

    python -m hvd_llama.train | prepare | data | export | convert | generate | plot | bench

Each command gives `main` an argparse parser and a body. The shell adds `--debug`, keeps
TensorFlow's start-up lines off the terminal, and turns a UserError into one line,
`error: ...` (`error (rank R): ...` once Horovod runs more than one process), with exit
status 2; `--debug` shows the traceback instead. Anything else is a bug and keeps its
traceback. `--help` prints to stdout and exits 0 (argparse's own behaviour).
"""

import os
import sys

from hvd_llama.errors import UserError


def main(parser, body, argv=None):
    """Parse argv with `parser`, run body(args); the process's exit status."""
    parser.add_argument("--debug", action="store_true", help="full tracebacks on bad input")
    args = parser.parse_args(argv)
    # Before TensorFlow is imported: its C++ INFO and WARNING lines are for its developers.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return body(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"error{_rank()}: {e}", file=sys.stderr, flush=True)
        return 2


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
