"""Checkpoints: every process writes its share of the state, all atomically together.

    <run.dir>/checkpoints/step-00000050/state.index, state.data-*-of-*, meta.json

The state is one TensorFlow tensor bundle of named whole tensors: `model/<variable path>` for
the weights, `optimizer/m/<path>` and `optimizer/v/<path>` for AdamW's moments, and the
optimizer's counters. Process r writes the rows Layout.share gives it of every tensor (rank 0
alone the scalars), whatever it holds: all of them (dist.zero=0) or just that share (ZeRO), so
nothing is gathered and the processes write in parallel. Rank 0 then merges the N bundles'
indexes into one. A reader asks for any rows of any tensor by name, which is what lets a
checkpoint written by N processes at one ZeRO stage resume on M processes at another.

The processes write into `step-*.partial-ranks` and rank 0 renames it into place once every
one has finished, so a crash mid-save (of any process) leaves the previous checkpoint as the
latest complete one. meta.json records the step, the data position (global rows consumed),
the model config the weights belong to, the layout that wrote it and every file's size.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import tensorflow as tf

from hvd_llama import compat, distributed as dist, optim
from hvd_llama.atomic import atomic_path, refused_as_user_error, remove, remove_stale
from hvd_llama.errors import UserError, read_json

KEEP = 3  # most recent checkpoints kept on disk
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_LEFTOVER = re.compile(r"^(step-\d{8})\.(partial|old)-")  # atomic_path's names
STATE = "state"  # the bundle's prefix inside a checkpoint directory


def directory(run_dir):
    return os.path.join(run_dir, "checkpoints")


def latest(run_dir):
    """Path of the newest complete checkpoint in run_dir, or None."""
    steps = sorted(_steps(run_dir))
    return os.path.join(directory(run_dir), f"step-{steps[-1]:08d}") if steps else None


def resume_point(config, move_damaged=True):
    """Whether this run starts fresh (None) or resumes (the meta of the checkpoint to resume
    from), decided by rank 0 before any compute: the trainer broadcasts the verdict. A UserError
    for a fresh start over another run's checkpoints, a resume without one (train.resume=true),
    or a resume of a different model shape. A checkpoint whose files are missing or truncated
    is passed over, with a line saying so, for the newest one before it that is whole (and,
    with `move_damaged`, moved aside)."""
    mode, steps = config.train.resume, sorted(_steps(config.run.dir), reverse=True)
    if not steps:
        if mode == "true":
            raise UserError(f"train.resume=true but {directory(config.run.dir)} holds no "
                            "checkpoint (train.resume=auto starts fresh when there is none)")
        return None
    if mode == "false":
        raise UserError(f"run.dir {config.run.dir} already holds checkpoints "
                        f"({latest(config.run.dir)}); pass train.resume=true to continue it, or "
                        "choose another run.dir")
    damaged = []
    for step in steps:
        path = os.path.join(directory(config.run.dir), f"step-{step:08d}")
        try:
            meta = read_meta(path)
            check_files(path, meta)
        except UserError as e:
            print(f"passing over checkpoint {path}: {e}", flush=True)
            damaged.append(e)
            continue
        _check_matches(path, meta, config)
        for bad in sorted(_steps(config.run.dir)) if move_damaged else []:  # kept for a look,
            if bad > step:                    # but out of the way of `latest`, pruning, saves
                bad = os.path.join(directory(config.run.dir), f"step-{bad:08d}")
                os.replace(bad, f"{bad}.damaged-{os.getpid()}")
                print(f"moved {bad} to {bad}.damaged-{os.getpid()}", flush=True)
        meta["path"] = path
        return meta
    raise UserError(f"no checkpoint in {directory(config.run.dir)} is whole; the newest: "
                    f"{damaged[0]}")


def _check_matches(path, meta, config):
    """A UserError unless checkpoint `meta` holds the model, sequence length and optimizer
    state layout `config` trains."""
    want = dataclasses.asdict(config.model)
    have = meta.get("model") or {}
    diff = [f"model.{k} (checkpoint {have.get(k)}, config {v})"
            for k, v in want.items() if have.get(k) != v]
    if diff:
        raise UserError(f"{path}: checkpoint holds a different model: {', '.join(diff)}")
    if meta.get("seq_len") != config.data.seq_len:
        raise UserError(f"{path}: checkpoint was trained with data.seq_len={meta.get('seq_len')},"
                        f" the config says {config.data.seq_len}")
    # float16 adds a loss scale to the optimizer state; the other two share one layout.
    if not meta.get("weights_only") and \
            (meta.get("precision") == "float16") != (config.train.precision == "float16"):
        raise UserError(f"{path}: checkpoint was trained with train.precision="
                        f"{meta.get('precision')}, the config says {config.train.precision}")


def load_latest(run_dir):
    """(config, float32 model, checkpoint path) of the newest checkpoint in run_dir: weights
    only, for exporting and converting."""
    from hvd_llama import config as config_lib, model as model_lib
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = config_lib.load(os.path.join(run_dir, "config.yaml"))
    path = latest(run_dir)
    if path is None:
        raise UserError(f"{directory(run_dir)}: no checkpoint")
    check_files(path, read_meta(path))
    model = model_lib.build(cfg.model, seed=0)
    _read(path, _entries(model))
    return cfg, model, path


def read_meta(path):
    meta_path = os.path.join(path, "meta.json")
    meta = read_json(meta_path, "checkpoint metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{meta_path}: checkpoint metadata lacks an integer 'step'")
    if not isinstance(meta.get("files"), dict):
        raise UserError(f"{meta_path}: no 'files' list: not a checkpoint of this hvd_llama "
                        "version (written before checkpoints were sharded)")
    return meta


def check_files(path, meta):
    """A UserError naming the first of the checkpoint's files that is missing or not the size
    it was written at; before anything is read."""
    for name, size in sorted(meta["files"].items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"{file}: checkpoint file missing")
        if os.path.getsize(file) != size:
            raise UserError(f"{file}: checkpoint file is {os.path.getsize(file)} bytes, "
                            f"{size} were written (truncated or changed)")


def restore(meta, model, optimizer):
    """Every process loads its part of the checkpoint `meta` names (None: nothing to load):
    the full weights, and the optimizer state it holds (all of it, or its ZeRO share),
    whatever layout wrote it. The optimizer must be built (its variables must exist)."""
    if meta is None:
        return
    entries = _entries(model, optimizer, moments=not meta.get("weights_only"))
    try:
        _read(meta["path"], entries)
    except tf.errors.OpError as e:
        raise UserError(f"{meta['path']}: cannot restore checkpoint "
                        f"({str(e).splitlines()[0]})") from e


def save(config, layout, step, rows, model, optimizer=None):
    """Every process writes its share of checkpoint `step` (rows = global sequences consumed
    so far); a collective that returns once the checkpoint is in place. Without an optimizer
    it holds the weights alone (an import): training resumes them with a fresh optimizer."""
    if layout.zero < 3:  # stage 3's processes hold different shares by design
        check_same_weights(model, step)
    final = os.path.join(directory(config.run.dir), f"step-{step:08d}")
    saving = atomic_path(final, tag="ranks")  # one directory for every process
    with saving if dist.is_chief() else contextlib.nullcontext(saving.tmp) as tmp, \
            refused_as_user_error(final):  # a full or read-only disk, on every rank
        if dist.is_chief():
            remove(tmp)  # a crashed save's leftover
            os.makedirs(tmp)
        dist.barrier()
        if layout.weight:  # a waiting dist.elastic process holds no share of its own
            _write(os.path.join(tmp, f"rank-{layout.rank:05d}"), _entries(model, optimizer),
                   layout)
        dist.barrier()
        if dist.is_chief():
            tf.raw_ops.MergeV2Checkpoints(
                checkpoint_prefixes=[os.path.join(tmp, f"rank-{r:05d}")
                                     for r in range(layout.processes)],
                destination_prefix=os.path.join(tmp, STATE), delete_old_dirs=False)
            meta = {"step": step, "rows": rows, "seq_len": config.data.seq_len,
                    "precision": config.train.precision, "weights_only": optimizer is None,
                    "model": dataclasses.asdict(config.model),
                    "layout": {"processes": layout.processes, "zero": layout.zero},
                    "files": {n: os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)}}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
    if dist.is_chief():
        for old in sorted(_steps(config.run.dir))[:-KEEP]:
            remove(os.path.join(directory(config.run.dir), f"step-{old:08d}"))
        for name in os.listdir(directory(config.run.dir)):  # what a killed save left
            if _LEFTOVER.match(name):
                remove_stale(os.path.join(directory(config.run.dir), _LEFTOVER.match(name)[1]))
    dist.barrier()  # on return the checkpoint is in place for every process to read


def check_same_weights(model, step):
    """A UserError, on every process alike, unless all processes hold the same weights: one
    allgather of a checksum each (exact sums of each tensor's float bits: a change of any one
    value shows, though changes that cancel out would not)."""
    sums = [tf.reduce_sum(tf.cast(tf.bitcast(tf.convert_to_tensor(v), tf.int32), tf.int64))
            for v in model.weights if v.dtype == "float32"]
    digest = hashlib.sha256(np.array(sums, dtype=np.int64).tobytes()).hexdigest()[:12]
    digests = dist.allgather_object(digest)
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        raise UserError(f"step {step}: the ranks' weights have diverged (" + "; ".join(
            f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: checksum {d}"
            for d, ranks in groups.items()) + f"); checkpoint {step} not written, the last one "
            "is intact")


def _entries(model, optimizer=None, moments=True):
    """[(name, variable, its first row in the named tensor, the tensor's full shape)] of what a
    checkpoint holds: the weights, and (with `moments`) the optimizer's moments and counters."""
    variables = model.trainable_variables
    # ZeRO's ShardedOptimizer holds rows from `starts` on; stage 0's optimizer all of them.
    inner, starts = (optimizer.inner, optimizer.starts) if hasattr(optimizer, "starts") \
        else (optimizer, [0] * len(variables))
    if getattr(optimizer, "stage", 0) == 3:  # the shares are the only copy of the weights
        entries = [(f"model/{v.path}", s, start, v.shape)
                   for v, s, start in zip(variables, optimizer.shares, starts)]
    else:
        entries = [(f"model/{v.path}", v, 0, v.shape) for v in model.variables]
    if optimizer is None or not moments:
        return entries
    adamw = optim.adamw(inner)
    for v, start, (m, s) in zip(variables, starts, compat.adam_moments(adamw)):
        entries += [(f"optimizer/m/{v.path}", m, start, v.shape),
                    (f"optimizer/v/{v.path}", s, start, v.shape)]
    entries.append(("optimizer/iterations", adamw.iterations, 0, ()))
    if inner is not adamw:  # float16's loss scale
        entries += [("optimizer/loss_scale", inner.dynamic_scale, 0, ()),
                    ("optimizer/loss_scale_steps", inner.step_counter, 0, ())]
    return entries


def _rows_spec(shape, start, stop):
    """SaveV2/RestoreV2's name for rows [start, stop) of a tensor of `shape`."""
    dims = " ".join(str(d) for d in shape)
    return f"{dims} {start},{stop - start}" + ":-" * (len(shape) - 1)


def _write(prefix, entries, layout):
    """This process's rows (Layout.share) of every entry; rank 0 also the scalars."""
    names, specs, tensors = [], [], []
    for name, variable, first, shape in entries:
        if not shape:
            if layout.rank == 0:
                names.append(name), specs.append(""), tensors.append(tf.convert_to_tensor(variable))
            continue
        a, b = layout.share(shape[0])
        if b > a:  # a tensor of fewer rows than processes leaves some with none
            names.append(name), specs.append(_rows_spec(shape, a, b))
            tensors.append(tf.convert_to_tensor(variable)[a - first:b - first])
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=specs,
                      tensors=tensors)


def _read(path, entries):
    """Load each entry's rows from the bundle at `path`, after checking that all of them are
    there with the right shapes, so that a mismatch changes nothing."""
    prefix = os.path.join(path, STATE)
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    for name, variable, first, shape in entries:
        if shapes.get(name) != list(shape):
            raise UserError(f"{path}: checkpoint has {name} of shape {shapes.get(name)}, the "
                            f"model wants {list(shape)}")
    for name, variable, first, shape in entries:
        rows = variable.shape[0] if shape else 0
        if shape and not rows:
            continue
        spec = _rows_spec(shape, first, first + rows) if shape else ""
        value = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name],
                                     shape_and_slices=[spec],
                                     dtypes=[tf.as_dtype(variable.dtype)])[0]
        variable.assign(value)


def _steps(run_dir):
    try:
        names = os.listdir(directory(run_dir))
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in map(_STEP_DIR.match, names) if m]
