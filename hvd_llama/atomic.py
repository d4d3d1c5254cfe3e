"""Write files and directories so that readers see all of them or none of them.

Everything hvd_llama leaves behind (prepared data, checkpoints, exports) is written under a
temporary name beside its final place and renamed on success. Rename is atomic within one
filesystem, so a crash mid-write leaves a `.partial-*` leftover, never a half-written result;
the next write to the same place removes it. A filesystem that refuses the write (full,
read-only) ends it the same way, with a UserError naming the place.
"""

import contextlib
import errno
import os
import re
import shutil

from hvd_llama.errors import UserError


def refuse_existing(path, overwrite):
    """An existing target is replaced only when asked: a UserError otherwise."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite to replace it)")


class atomic_path:
    """`with atomic_path(final) as tmp:` write the file or directory `tmp`; it becomes `final`
    only if the block succeeds. An existing `final` directory is replaced only then. `tag`
    names `tmp` (default: this process's id), for several processes writing into one."""

    def __init__(self, final, tag=None):
        self.final = final
        self.tmp = f"{final}.partial-{tag or os.getpid()}"

    def __enter__(self):
        with refused_as_user_error(self.final):
            os.makedirs(os.path.dirname(os.path.abspath(self.final)), exist_ok=True)
            remove_stale(self.final)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            remove(self.tmp)
            _raise_if_refused(self.final, exc)
        elif os.path.isdir(self.final) and os.path.isdir(self.tmp):
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = f"{self.final}.old-{os.getpid()}"
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            remove(old)
        else:
            os.replace(self.tmp, self.final)


# What a filesystem answers when it will not take a write: full, over quota, read-only, not ours.
_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def refusal(exc):
    """The reason (e.g. "No space left on device") if `exc` is a filesystem refusing a write,
    as an OSError or as one of TensorFlow's errors (which carry only the text); else None."""
    if isinstance(exc, OSError):
        return exc.strerror if exc.errno in _REFUSALS else None
    if isinstance(exc, UserError):  # ours: it already says what to do
        return None
    return next((os.strerror(e) for e in _REFUSALS if os.strerror(e) in str(exc)), None)


@contextlib.contextmanager
def refused_as_user_error(final):
    """A refused write inside the block becomes a UserError naming `final`."""
    try:
        yield
    except Exception as e:
        _raise_if_refused(final, e)
        raise


def _raise_if_refused(final, exc):
    """A UserError for a refused write to `final`, to what is written in its place or to the
    directories above it (an error naming another path, such as an input's, is left as is)."""
    reason = refusal(exc)
    if not reason:
        return
    if isinstance(exc, OSError):  # no filename: a write to a file the block has open
        path, target = os.path.abspath(exc.filename or final), os.path.abspath(final)
        ours = path.startswith(target) or target.startswith(path + os.sep)
    else:  # TensorFlow's errors name the file they could not write
        ours = final in str(exc)
    if ours:
        raise UserError(f"{final}: cannot write it ({reason}); nothing was replaced, what was "
                        "there is intact") from exc


def writable_file(path):
    """A UserError unless a file can be written at `path`: checked before work that ends in it."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; give a file name")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"{path}: cannot write there ({parent} is not a writable directory)")


def follow_umask(path):
    """Give `path` the mode a plain open() would have (some writers make 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def remove_stale(final):
    """Remove what writers of `final` killed mid-write left beside it: `.partial-TAG` and
    `.old-TAG` entries, unless TAG is a live process (it may still be writing). An `.old-PID`
    whose `final` is missing was killed between its two renames: it is put back."""
    parent, name = os.path.split(os.path.abspath(final))
    pattern = re.compile(re.escape(name) + r"\.(partial|old)-(\w+)$")
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.match(entry)
        tag = match and match.group(2)  # a pid, or a name such as checkpoints' "ranks"
        if match and not (tag.isdigit() and _alive(int(tag))):
            if match.group(1) == "old" and not os.path.exists(final):
                os.replace(os.path.join(parent, entry), final)
            else:
                remove(os.path.join(parent, entry))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def write_bytes(path, payload):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
