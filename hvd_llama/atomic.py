"""Write files and directories so that readers see all of them or none of them.

Everything hvd_llama leaves behind (prepared data, checkpoints, exports) is written under a
temporary name beside its final place and renamed on success. Rename is atomic within one
filesystem, so a crash mid-write leaves a `.partial-*` leftover, never a half-written result.
"""

import os
import shutil


def refuse_existing(path, overwrite):
    """An existing target is replaced only when asked: a UserError otherwise."""
    from hvd_llama.errors import UserError
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
        os.makedirs(os.path.dirname(os.path.abspath(self.final)), exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            remove(self.tmp)
        elif os.path.isdir(self.final) and os.path.isdir(self.tmp):
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = f"{self.final}.old-{os.getpid()}"
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            remove(old)
        else:
            os.replace(self.tmp, self.final)


def write_bytes(path, payload):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
