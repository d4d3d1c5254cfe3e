"""Checkpoints: written by rank 0 alone and atomically, read by rank 0 (the trainer broadcasts).

    <run.dir>/checkpoints/step-00000050/ckpt.index, ckpt.data-*, meta.json

A checkpoint directory appears only by renaming a finished one into place, so a crash mid-save
leaves the previous checkpoint as the latest good one. meta.json records the step, the data
position (global rows consumed) and the model config that the weights belong to.
"""

import dataclasses
import json
import os
import re

import tensorflow as tf

from hvd_llama import distributed as dist
from hvd_llama.atomic import atomic_path, remove
from hvd_llama.errors import UserError, read_json

KEEP = 3  # most recent checkpoints kept on disk
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def directory(run_dir):
    return os.path.join(run_dir, "checkpoints")


def latest(run_dir):
    """Path of the newest complete checkpoint in run_dir, or None."""
    steps = sorted(_steps(run_dir))
    return os.path.join(directory(run_dir), f"step-{steps[-1]:08d}") if steps else None


def resume_point(config):
    """Whether this run starts fresh (None) or resumes (the meta of the checkpoint to resume
    from), decided by rank 0 before any compute: the trainer broadcasts the verdict. A UserError
    for a fresh start over another run's checkpoints, or a resume of a different model shape."""
    path = latest(config.run.dir)
    if path is None:
        if config.train.resume:
            print(f"train.resume=true but {directory(config.run.dir)} holds no checkpoint: "
                  "starting fresh", flush=True)
        return None
    if not config.train.resume:
        raise UserError(f"run.dir {config.run.dir} already holds checkpoints ({path}); pass "
                        "train.resume=true to continue it, or choose another run.dir")
    meta = read_meta(path)
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
    meta["path"] = path
    return meta


def load_latest(run_dir):
    """(config, float32 model, checkpoint path) of the newest checkpoint in run_dir: weights
    only, for exporting and converting."""
    from hvd_llama import config as config_lib, model as model_lib
    cfg = config_lib.load(os.path.join(run_dir, "config.yaml"))
    path = latest(run_dir)
    if path is None:
        raise UserError(f"{directory(run_dir)}: no checkpoint")
    model = model_lib.build(cfg.model, seed=0)
    tf.train.Checkpoint(model=model).read(os.path.join(path, "ckpt")).expect_partial()
    return cfg, model, path


def read_meta(path):
    meta_path = os.path.join(path, "meta.json")
    meta = read_json(meta_path, "checkpoint metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{meta_path}: checkpoint metadata lacks an integer 'step'")
    return meta


def restore(meta, model, optimizer):
    """Load the checkpoint `meta` names (None: nothing to load) on rank 0; the trainer then
    broadcasts rank 0's weights and optimizer state. The optimizer must be built (its variables
    must exist) before this is called."""
    if meta is not None and dist.is_chief():
        prefix = os.path.join(meta["path"], "ckpt")
        try:
            if meta.get("weights_only"):
                tf.train.Checkpoint(model=model).read(prefix).assert_existing_objects_matched()
            else:
                tf.train.Checkpoint(model=model, optimizer=optimizer).read(prefix)\
                    .assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            raise UserError(f"{meta['path']}: cannot restore checkpoint "
                            f"({str(e).splitlines()[0]})") from e


def save(config, step, rows, model, optimizer=None):
    """Rank 0 writes checkpoint `step` (rows = global sequences consumed so far). Without an
    optimizer it holds the weights alone (an import): training resumes them with a fresh
    optimizer."""
    if not dist.is_chief():
        return
    final = os.path.join(directory(config.run.dir), f"step-{step:08d}")
    objects = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    with atomic_path(final) as tmp:
        os.makedirs(tmp)
        tf.train.Checkpoint(**objects).write(os.path.join(tmp, "ckpt"))
        meta = {"step": step, "rows": rows, "seq_len": config.data.seq_len,
                "precision": config.train.precision, "weights_only": optimizer is None,
                "model": dataclasses.asdict(config.model)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    for old in sorted(_steps(config.run.dir))[:-KEEP]:
        remove(os.path.join(directory(config.run.dir), f"step-{old:08d}"))


def _steps(run_dir):
    try:
        names = os.listdir(directory(run_dir))
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in map(_STEP_DIR.match, names) if m]
