"""Text generation: the whole sampling loop inside one tf.function, with a key/value cache.

    python -m hvd_llama.generate RUN_DIR_OR_SAVEDMODEL --prompt "..." [--max-new-tokens 64]
        [--temperature 0.8] [--top-p 0.95] [--seed 0]

make_generate() is what the exported SavedModel serves as `generate` (export.py). Prompts come
right-padded with their lengths; generation starts at the shortest prompt and, row by row,
keeps prompt tokens where a longer prompt still has them (keras-hub's own scheme). The cache
holds every position's keys and values, so a step runs one token through the model; with
use_cache=False each step reruns the whole buffer instead (the reference, and the benchmark's
peer).
"""

import argparse
import os
import re
import sys

from hvd_llama import cli, compat
from hvd_llama.tokenizer import BOS_ID, EOS_ID  # <s>, </s>


def make_generate(model, context, use_cache=True):
    """A tf.function (token_ids int32 [b, p] right-padded, lengths int32 [b], max_new_tokens
    int32, temperature float32 (0 = greedy), top_p float32, seed int64) -> {"token_ids": int32
    [b, p + max_new_tokens], "lengths": int32 [b], up to and including the first </s>}.
    p + max_new_tokens beyond `context` tokens is an InvalidArgumentError."""
    import tensorflow as tf

    @tf.function
    def generate(token_ids, lengths, max_new_tokens, temperature, top_p, seed):
        total = tf.shape(token_ids)[1] + max_new_tokens
        tf.debugging.assert_less_equal(total, context, message=(
            f"the prompt plus max_new_tokens exceed the model context of {context} tokens"))
        tokens = tf.pad(token_ids, [[0, 0], [0, max_new_tokens]])  # [b, total]
        is_prompt = tf.sequence_mask(lengths, total)
        if use_cache:
            _, cache = compat.build_cache(model, tokens)  # keras-hub's prefill over the buffer
        else:
            cache = tf.zeros([0])

        def step(index, tokens, cache):  # writes position `index`
            if use_cache:
                logits, _, cache = model.call_with_cache(tokens[:, index - 1:index], cache,
                                                         index - 1)
                logits = logits[:, 0]
            else:
                logits = model({"token_ids": tokens, "padding_mask": tf.ones_like(tokens)},
                               training=False)[:, index - 1]
            chosen = _sample(logits, temperature, top_p, seed, index)
            chosen = tf.where(is_prompt[:, index], tokens[:, index], chosen)
            here = tf.one_hot(index, total, on_value=True, off_value=False, dtype=tf.bool)
            return index + 1, tf.where(here[tf.newaxis], chosen[:, tf.newaxis], tokens), cache

        _, tokens, _ = tf.while_loop(lambda index, *_: index < total, step,
                                     (tf.reduce_min(lengths), tokens, cache))
        ends = (tokens == EOS_ID) & ~is_prompt
        first_end = tf.argmax(tf.cast(ends, tf.int32), axis=1, output_type=tf.int32)
        lengths_out = tf.where(tf.reduce_any(ends, axis=1), first_end + 1, total)
        return {"token_ids": tokens, "lengths": lengths_out}

    return generate


def _sample(logits, temperature, top_p, seed, index):
    """The next token of each row of logits [b, vocab]: the most likely one at temperature 0,
    else drawn from the nucleus (seeded by seed and the position `index`)."""
    import tensorflow as tf
    logits = tf.cast(logits, tf.float32)

    def nucleus():
        # Keep the most likely tokens whose probabilities sum to top_p (at least one).
        ordered, order = tf.math.top_k(logits / temperature, k=tf.shape(logits)[-1])
        before = tf.math.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
        kept = tf.where(before < top_p, ordered, tf.fill(tf.shape(ordered), -1e30))
        pick = tf.random.stateless_categorical(
            kept, 1, seed=tf.stack([seed, tf.cast(index, tf.int64)]), dtype=tf.int32)
        return tf.gather(order, pick[:, 0], batch_dims=1)

    return tf.cond(temperature > 0, nucleus,
                   lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory, or a SavedModel with generate_text "
                                       "(RUN_DIR/saved_model_text/<version>)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=cli.at_least(1), default=64)
    parser.add_argument("--temperature", type=cli.at_least(0.0, float), default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    return cli.main(parser, _generate, argv)


def _generate(args):
    cli.import_tensorflow()
    print(generate_text(args.source, args.prompt, args.max_new_tokens, args.temperature,
                        args.top_p, args.seed))


def generate_text(source, prompt, max_new_tokens, temperature, top_p, seed):
    """The continuation of `prompt` by a SavedModel's generate_text signature, or by a run
    directory's latest checkpoint and tokenizer."""
    import tensorflow as tf
    from hvd_llama.errors import UserError
    if tf.saved_model.contains_saved_model(source):
        import tensorflow_text  # noqa: F401 (registers the sentencepiece ops)
        served = tf.saved_model.load(source).signatures["generate_text"]
        try:
            out = served(prompts=tf.constant([prompt]),
                         max_new_tokens=tf.constant(max_new_tokens),
                         temperature=tf.constant(temperature), top_p=tf.constant(top_p),
                         seed=tf.constant(seed, tf.int64))
        except tf.errors.InvalidArgumentError as e:
            found = re.search(r"assertion failed: \[([^\]]*)\]", e.message)
            raise UserError(found.group(1) if found else e.message.splitlines()[0]) from e
        return out["text"][0].numpy().decode()
    from hvd_llama import checkpoint, tokenizer
    cfg, model, _ = checkpoint.load_latest(source)
    sp = tokenizer.load(os.path.join(source, "tokenizer.model"))
    ids = [BOS_ID] + sp.encode(prompt)
    if len(ids) + max_new_tokens > cfg.model.max_position_embeddings:
        raise UserError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens "
                        f"{max_new_tokens} exceed the model's context, "
                        f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
    out = make_generate(model, cfg.model.max_position_embeddings)(
        tf.constant([ids], tf.int32), tf.constant([len(ids)]), tf.constant(max_new_tokens),
        tf.constant(temperature), tf.constant(top_p), tf.constant(seed, tf.int64))
    new = out["token_ids"][0, len(ids):out["lengths"][0]].numpy().tolist()
    return sp.decode([t for t in new if t != EOS_ID])


if __name__ == "__main__":
    sys.exit(main())
