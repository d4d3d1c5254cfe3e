"""SavedModel export in TF Serving's layout (DIR/<version>/), with explicit signatures:

    serving_default(token_ids: int32 [batch, seq], padding_mask: int32 [batch, seq])
        -> {"logits": float32 [batch, seq, vocab]}
    generate(token_ids: int32 [batch, prompt] right-padded, lengths: int32 [batch],
             max_new_tokens: int32, temperature: float32 (0 = greedy), top_p: float32,
             seed: int64)
        -> {"token_ids": int32 [batch, prompt + max_new_tokens], "lengths": int32 [batch]}
    generate_text(prompts: string [batch], max_new_tokens, temperature, top_p, seed)
        -> {"text": string [batch]}

generate runs the whole sampling loop in the graph with a key/value cache (generate.py).
generate_text carries the sentencepiece model inside the graph (tensorflow-text), so a client
needs TensorFlow and tensorflow-text but no Python tokenizer and no hvd_llama. Stock TF
Serving and saved_model_cli cannot load tensorflow-text's ops, so generate_text goes into a
second SavedModel, DIR_text/<version>/ (with the other two signatures as well), written
when the run has a tokenizer.model.

    python -m hvd_llama.export RUN_DIR [--output DIR] [--version N] [--overwrite]

writes the run's latest checkpoint to DIR/N and DIR_text/N (default DIR RUN_DIR/saved_model,
N one past the highest version there). An existing version is refused unless --overwrite,
and replaced only once the new one is complete.
"""

import argparse
import os
import sys

from hvd_llama import cli

# Before anything else loads TensorFlow: `python -m hvd_llama.export` starts in this module.
tf = cli.import_tensorflow()

import keras  # noqa: E402

from hvd_llama import checkpoint, generate  # noqa: E402
from hvd_llama.atomic import atomic_path, refuse_existing  # noqa: E402
from hvd_llama.tokenizer import EOS_ID  # noqa: E402

_LOGITS_SPEC = [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                tf.TensorSpec([None, None], tf.int32, name="padding_mask")]
_SAMPLING_SPEC = [tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                  tf.TensorSpec([], tf.float32, name="temperature"),
                  tf.TensorSpec([], tf.float32, name="top_p"),
                  tf.TensorSpec([], tf.int64, name="seed")]
_GENERATE_SPEC = [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                  tf.TensorSpec([None], tf.int32, name="lengths")] + _SAMPLING_SPEC
_TEXT_SPEC = [tf.TensorSpec([None], tf.string, name="prompts")] + _SAMPLING_SPEC


def next_version(directory):
    """One past the highest numeric version under `directory` or `directory`_text (1 if
    none), so that the two SavedModels of one export share their version."""
    versions = [int(n) for d in (directory, f"{directory}_text") if os.path.isdir(d)
                for n in os.listdir(d) if n.isdigit()]
    return max(versions, default=0) + 1


def export(model, directory, version, context, tokenizer_path=None, overwrite=False):
    """Write DIRECTORY/VERSION with serving_default and generate, TensorFlow ops only (what TF
    Serving and saved_model_cli load), and, given a tokenizer, DIRECTORY_text/VERSION with
    generate_text as well (loading it needs tensorflow-text's ops). Generation refuses to run
    past `context` tokens (model.max_position_embeddings). Returns the paths written."""
    targets = [(os.path.join(directory, str(version)), False)]
    if tokenizer_path and os.path.isfile(tokenizer_path):
        targets.append((os.path.join(f"{directory}_text", str(version)), True))
    for path, _ in targets:
        refuse_existing(path, overwrite)

    # Traced once, here, and shared by both SavedModels.
    @tf.function(input_signature=_LOGITS_SPEC)
    def serve(token_ids, padding_mask):
        logits = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
        return {"logits": tf.cast(logits, tf.float32)}

    generate_fn = tf.function(generate.make_generate(model, context),
                              input_signature=_GENERATE_SPEC)
    serve.get_concrete_function()
    generate_fn.get_concrete_function()
    for path, with_text in targets:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serving_default", serve)
        archive.add_endpoint("generate", generate_fn)
        if with_text:
            _add_text_endpoint(archive, generate_fn, tokenizer_path)
        with atomic_path(path) as tmp:
            archive.write_out(tmp, verbose=False)
    return [path for path, _ in targets]


def _add_text_endpoint(archive, generate_fn, tokenizer_path):
    import tensorflow_text as tf_text
    with open(tokenizer_path, "rb") as f:
        sp = tf_text.SentencepieceTokenizer(model=f.read(), add_bos=True)
    archive.track(sp)  # its model is a resource the SavedModel must carry

    def generate_text(prompts, max_new_tokens, temperature, top_p, seed):
        ids = sp.tokenize(prompts)  # ragged [batch, (tokens)], <s> first
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        out = generate_fn(ids.to_tensor(), lengths, max_new_tokens, temperature, top_p, seed)
        tokens = out["token_ids"]
        position = tf.range(tf.shape(tokens)[1])[tf.newaxis]
        new = (position >= lengths[:, tf.newaxis]) & \
            (position < out["lengths"][:, tf.newaxis]) & (tokens != EOS_ID)
        return {"text": sp.detokenize(tf.ragged.boolean_mask(tokens, new))}

    archive.add_endpoint("generate_text", generate_text, input_signature=_TEXT_SPEC)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--output", help="default: RUN_DIR/saved_model")
    parser.add_argument("--version", type=cli.at_least(1),
                        help="default: one past the highest there")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    return cli.main(parser, _export_run, argv)


def _export_run(args):
    cfg, model, path = checkpoint.load_latest(args.run_dir)
    directory = args.output or os.path.join(args.run_dir, "saved_model")
    version = args.version if args.version is not None else next_version(directory)
    out = export(model, directory, version, cfg.model.max_position_embeddings,
                 os.path.join(args.run_dir, "tokenizer.model"), args.overwrite)
    print(f"exported {path} -> {', '.join(out)}")


if __name__ == "__main__":
    sys.exit(main())
