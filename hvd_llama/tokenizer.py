"""SentencePiece tokenizers, trained the way LLaMA's was.

LLaMA's tokenizer: BPE, digits split into single tokens, unknown bytes falling back to byte
tokens, no text normalization, ids 0/1/2 = <unk>/<s>/</s>, no padding id.
"""

import os

import sentencepiece as spm

from hvd_llama.errors import UserError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train(corpus_path, model_path, vocab_size, threads=None):
    """Train a LLaMA-style BPE model on a text file; writes `model_path` atomically."""
    prefix = f"{model_path}.partial-{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            input=corpus_path,
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=0.99995,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            input_sentence_size=2_000_000,  # a bounded sample keeps large corpora cheap
            shuffle_input_sentence=True,
            num_threads=threads or os.cpu_count(),
            minloglevel=2,
        )
    except RuntimeError as e:  # the caller says which input or flag this is about
        raise UserError(f"cannot train a {vocab_size}-token tokenizer on this text "
                        f"({str(e).splitlines()[-1]})") from e
    os.replace(prefix + ".model", model_path)
    os.remove(prefix + ".vocab")


def load(model_path, vocab_size=None):
    """Load a sentencepiece model; if `vocab_size` is given, it must match the model's."""
    if not os.path.isfile(model_path):
        raise UserError(f"tokenizer not found: {model_path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{model_path}: not a sentencepiece model ({e})") from e
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise UserError(f"{model_path}: tokenizer has {sp.vocab_size()} tokens but "
                        f"'model.vocab_size' is {vocab_size}")
    return sp
