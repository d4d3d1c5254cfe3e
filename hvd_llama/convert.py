"""Weights in and out: Hugging Face and keras-hub LLaMA checkpoints <-> hvd_llama run dirs.

    python -m hvd_llama.convert import-hf HF_DIR RUN_DIR
    python -m hvd_llama.convert export-hf RUN_DIR HF_OUT
    python -m hvd_llama.convert import-keras-hub PRESET_DIR RUN_DIR
    python -m hvd_llama.convert export-keras-hub RUN_DIR PRESET_DIR

An import creates RUN_DIR with a resolved config.yaml (the model section from the source), a
weights-only checkpoint at step 0 and tokenizer.model when the source has one; fine-tune it
with `python -m hvd_llama.train --config RUN_DIR/config.yaml train.resume=true
data.path=...` (a dataset prepared with `--tokenizer RUN_DIR/tokenizer.model`). An export
writes from RUN_DIR's latest checkpoint. Targets are written beside their final place and
renamed at the end; an existing target is refused unless --overwrite.

Hugging Face directories (hf.py: the format) are read with no network, one shard at a time,
each memory-mapped, so the peak memory stays near the model's own size.
"""

import argparse
import os
import shutil
import sys

from hvd_llama import cli, compat, hf
from hvd_llama.atomic import atomic_path, refuse_existing
from hvd_llama.errors import UserError


def model_config_from_keras_hub(backbone):
    from hvd_llama.config import ModelConfig
    c = backbone.get_config()
    if c.get("rope_position_scaling_factor", 1.0) != 1.0 or \
            c.get("rope_frequency_adjustment_factor") is not None:
        raise UserError("the keras-hub preset uses scaled RoPE, which hvd_llama does not "
                        "support (only the original LLaMA RoPE)")
    return ModelConfig(
        vocab_size=c["vocabulary_size"], num_layers=c["num_layers"],
        num_query_heads=c["num_query_heads"], num_key_value_heads=c["num_key_value_heads"],
        hidden_dim=c["hidden_dim"], intermediate_dim=c["intermediate_dim"],
        rope_max_wavelength=float(c["rope_max_wavelength"]),
        layer_norm_epsilon=float(c["layer_norm_epsilon"]),
        tie_word_embeddings=compat.tied_embeddings(backbone))


def _new_run(mc, run_dir, fill, tokenizer):
    """Write RUN_DIR: config.yaml, the weights-only checkpoint step 0, tokenizer.model."""
    import dataclasses
    from hvd_llama import checkpoint, config as config_lib, model as model_lib
    from hvd_llama.layout import Layout
    model = model_lib.build(mc, seed=0)
    fill(model)
    with atomic_path(run_dir) as tmp:
        cfg = config_lib.load(None, [f"run.dir={run_dir}"])
        cfg = dataclasses.replace(cfg, model=mc, data=dataclasses.replace(
            cfg.data, seq_len=min(cfg.data.seq_len, mc.max_position_embeddings)))
        config_lib.validate(cfg)  # e.g. heads that do not divide the width
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_lib.to_yaml(cfg))
        checkpoint.save(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=tmp)),
                        Layout.of(cfg), 0, 0, model)
        _copy_if_present(tokenizer, os.path.join(tmp, "tokenizer.model"))
    return run_dir


def import_hf(hf_dir, run_dir, overwrite=False):
    mc = hf.model_config(hf_dir)
    refuse_existing(run_dir, overwrite)
    tensors = hf.tensors(mc, hf_dir)
    return _new_run(mc, run_dir, lambda model: hf.load_weights(model, mc, tensors),
                    os.path.join(hf_dir, "tokenizer.model"))


def export_hf(run_dir, hf_out, overwrite=False):
    from hvd_llama import checkpoint
    refuse_existing(hf_out, overwrite)
    cfg, model, _ = checkpoint.load_latest(run_dir)
    with atomic_path(hf_out) as tmp:
        os.makedirs(tmp)
        hf.save(model, cfg.model, tmp)
        _copy_if_present(os.path.join(run_dir, "tokenizer.model"),
                         os.path.join(tmp, "tokenizer.model"))
    return hf_out


def import_keras_hub(preset_dir, run_dir, overwrite=False):
    import keras_hub
    refuse_existing(run_dir, overwrite)
    try:
        source = keras_hub.models.LlamaBackbone.from_preset(preset_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{preset_dir}: not a keras-hub Llama preset ({e})") from e
    mc = model_config_from_keras_hub(source)

    def fill(model):
        theirs = {v.path: v for v in source.weights}
        for v in model.backbone.weights:
            v.assign(theirs[v.path])

    return _new_run(mc, run_dir, fill,
                    os.path.join(preset_dir, "assets", "tokenizer", "vocabulary.spm"))


def export_keras_hub(run_dir, preset_dir, overwrite=False):
    import keras_hub
    from hvd_llama import checkpoint
    refuse_existing(preset_dir, overwrite)
    _, model, _ = checkpoint.load_latest(run_dir)
    with atomic_path(preset_dir) as tmp:
        model.backbone.save_to_preset(tmp)
        if model.backbone.tie_word_embeddings:  # keras-hub leaves it out of the preset
            compat.tie_embeddings_in_preset(tmp)
        tokenizer = os.path.join(run_dir, "tokenizer.model")
        if os.path.isfile(tokenizer):
            keras_hub.models.LlamaTokenizer(proto=tokenizer).save_to_preset(tmp)
    return preset_dir


def _copy_if_present(src, dest):
    if os.path.isfile(src):
        shutil.copyfile(src, dest)


COMMANDS = {"import-hf": import_hf, "export-hf": export_hf,
            "import-keras-hub": import_keras_hub, "export-keras-hub": export_keras_hub}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target")
    return cli.main(parser, _convert, argv)


def _convert(args):
    cli.import_tensorflow()
    out = COMMANDS[args.command](args.source, args.target, args.overwrite)
    print(f"{args.command}: {args.source} -> {out}")


if __name__ == "__main__":
    sys.exit(main())
