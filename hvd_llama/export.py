"""SavedModel export with an explicit serving signature, for TF Serving or tf.saved_model.load.

    serving_default(token_ids: int32 [batch, seq], padding_mask: int32 [batch, seq])
        -> {"logits": float32 [batch, seq, vocab]}

    python -m hvd_llama.export RUN_DIR [--output DIR]   # from the run's latest checkpoint
"""

import argparse
import os
import sys

import keras
import tensorflow as tf

from hvd_llama import checkpoint, config as config_lib, model as model_lib
from hvd_llama.atomic import atomic_path
from hvd_llama.errors import UserError

_SPEC = [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
         tf.TensorSpec([None, None], tf.int32, name="padding_mask")]


def export(model, path):
    """Write `model` as a SavedModel at `path`; an existing export is replaced only on success."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(token_ids, padding_mask):
        logits = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
        return {"logits": tf.cast(logits, tf.float32)}

    archive.add_endpoint("serving_default", serve, input_signature=_SPEC)
    with atomic_path(path) as tmp:
        archive.write_out(tmp, verbose=False)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--output", help="default: RUN_DIR/saved_model")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(os.path.join(args.run_dir, "config.yaml"))
        path = checkpoint.latest(args.run_dir)
        if path is None:
            raise UserError(f"{checkpoint.directory(args.run_dir)}: no checkpoint to export")
        model = model_lib.build(cfg.model, seed=0)
        tf.train.Checkpoint(model=model).read(os.path.join(path, "ckpt")).expect_partial()
        out = export(model, args.output or os.path.join(args.run_dir, "saved_model"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
