"""The Hugging Face LLaMA format: config.json, and weights as safetensors (one file, or shards
with model.safetensors.index.json), mapped to and from keras-hub's variables. Read with no
network, one shard at a time, each memory-mapped. convert.py runs the commands.
"""

import json
import os

import numpy as np

from hvd_llama.atomic import follow_umask
from hvd_llama.errors import UserError, read_json

# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, which TF ships).
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def weight_map(mc):
    """[(Hugging Face name, HF shape, keras-hub variable path, transposed)] for ModelConfig mc.

    HF stores Linear weights as [out, in]; keras-hub's kernels are [in, out], with the head
    axes split out ([d, heads, head_dim] for q/k/v, [heads, head_dim, d] for the output).
    Embeddings are [vocab, d] in both; the output embedding is HF's transposed lm_head."""
    d, hd = mc.hidden_dim, mc.hidden_dim // mc.num_query_heads
    q, kv, inner = mc.num_query_heads * hd, mc.num_key_value_heads * hd, mc.intermediate_dim
    out = [("model.embed_tokens.weight", (mc.vocab_size, d), "token_embedding/embeddings",
            False)]
    if not mc.tie_word_embeddings:
        out.append(("lm_head.weight", (mc.vocab_size, d), "token_embedding/reverse_embeddings",
                    True))
    for i in range(mc.num_layers):
        hf, k = f"model.layers.{i}.", f"transformer_layer_{i}/"
        out += [
            (hf + "input_layernorm.weight", (d,), k + "self_attention_layernorm/scale", False),
            (hf + "self_attn.q_proj.weight", (q, d), k + "self_attention/query/kernel", True),
            (hf + "self_attn.k_proj.weight", (kv, d), k + "self_attention/key/kernel", True),
            (hf + "self_attn.v_proj.weight", (kv, d), k + "self_attention/value/kernel", True),
            (hf + "self_attn.o_proj.weight", (d, q), k + "self_attention/attention_output/kernel",
             True),
            (hf + "post_attention_layernorm.weight", (d,), k + "feedforward_layernorm/scale",
             False),
            (hf + "mlp.gate_proj.weight", (inner, d), k + "feedforward_gate_dense/kernel", True),
            (hf + "mlp.up_proj.weight", (inner, d), k + "feedforward_intermediate_dense/kernel",
             True),
            (hf + "mlp.down_proj.weight", (d, inner), k + "feedforward_output_dense/kernel", True),
        ]
    out.append(("model.norm.weight", (d,), "sequence_output_layernorm/scale", False))
    return out


def model_config(hf_dir):
    """ModelConfig from a Hugging Face LLaMA config.json; a UserError for anything else."""
    from hvd_llama.config import ModelConfig
    path = os.path.join(hf_dir, "config.json")
    hc = read_json(path, "Hugging Face config")
    if hc.get("model_type") != "llama":
        raise UserError(f"{path}: model_type is {hc.get('model_type')!r}, not 'llama'")
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{path}: RoPE type {rope.get('rope_type', rope.get('type'))!r} is not "
                        "supported (only the original LLaMA RoPE)")
    for key, plain in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hc.get(key, plain) != plain:
            raise UserError(f"{path}: {key}={hc[key]!r} is not LLaMA's ({plain!r})")
    try:
        heads = hc["num_attention_heads"]
        mc = ModelConfig(
            vocab_size=hc["vocab_size"], num_layers=hc["num_hidden_layers"],
            num_query_heads=heads, num_key_value_heads=hc.get("num_key_value_heads", heads),
            hidden_dim=hc["hidden_size"], intermediate_dim=hc["intermediate_size"],
            rope_max_wavelength=float(rope.get("rope_theta", hc.get("rope_theta", 10000.0))),
            layer_norm_epsilon=float(hc.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hc.get("tie_word_embeddings", False)),
            max_position_embeddings=hc.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise UserError(f"{path}: missing key {e}") from e
    head_dim = hc.get("head_dim") or mc.hidden_dim // heads
    if head_dim * heads != mc.hidden_dim:
        raise UserError(f"{path}: head_dim {head_dim} x {heads} heads != hidden_size "
                        f"{mc.hidden_dim} (keras-hub's Llama needs them equal)")
    return mc


def hf_config(mc):
    """config.json for transformers.LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": mc.vocab_size, "hidden_size": mc.hidden_dim,
        "intermediate_size": mc.intermediate_dim, "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_query_heads,
        "num_key_value_heads": mc.num_key_value_heads,
        "head_dim": mc.hidden_dim // mc.num_query_heads, "hidden_act": "silu",
        "rms_norm_eps": mc.layer_norm_epsilon, "rope_theta": mc.rope_max_wavelength,
        "max_position_embeddings": mc.max_position_embeddings,
        "tie_word_embeddings": mc.tie_word_embeddings, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def read_safetensors(path):
    """{name: memory-mapped numpy array} of one safetensors file; a UserError naming the file
    if it is not one or is cut short."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a safetensors file ({e})") from e
    if header is None:
        raise UserError(f"{path}: truncated (its header runs past the end of the file)")
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated ({size:,} bytes, its header needs {8 + n + end:,})")
    import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy)
    out = {}
    for name, t in header.items():
        if t["dtype"] not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {t['dtype']}")
        begin, stop = t["data_offsets"]
        dtype = np.dtype(_DTYPES[t["dtype"]])
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin,
                              shape=((stop - begin) // dtype.itemsize,)).reshape(t["shape"])
    return out


def _hf_shards(hf_dir):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json(index, "shard index")["weight_map"].values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(hf_dir, shard)):
                raise UserError(f"{hf_dir}: shard {shard} (named by {os.path.basename(index)}) "
                                "is missing")
        return [os.path.join(hf_dir, s) for s in shards]
    shards = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not shards:
        raise UserError(f"{hf_dir}: no *.safetensors weights")
    return [os.path.join(hf_dir, s) for s in shards]


def tensors(mc, hf_dir):
    """{HF name: memory-mapped array} of every tensor a model of ModelConfig mc needs, checked
    against the config (names, shapes, nothing missing) before any weight is built."""
    table = {hf: shape for hf, shape, _, _ in weight_map(mc)}
    found = {}
    for shard in _hf_shards(hf_dir):
        for name, array in read_safetensors(shard).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old checkpoints saved; RoPE is recomputed
            if name not in table:
                raise UserError(f"{shard}: tensor {name} has no place in a LLaMA model")
            if tuple(array.shape) != table[name]:
                raise UserError(f"{shard}: {name} has shape {list(array.shape)}, config.json "
                                f"implies {list(table[name])}")
            found[name] = array
    missing = [name for name in table if name not in found]
    if missing:
        raise UserError(f"{hf_dir}: no shard holds {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return found


def load_weights(model, mc, tensors):
    """Fill `model` (built from mc) from tensors(), emptying it: each tensor is read from
    its shard as it is assigned and unmapped right after."""
    variables = {v.path: v for v in model.backbone.weights}
    for name, _, path, transposed in weight_map(mc):
        value = tensors.pop(name).astype(np.float32, copy=False)  # no copy when float32
        variables[path].assign(np.reshape(value.T if transposed else value,
                                          variables[path].shape))


def save(model, mc, out_dir, max_shard_bytes=2 << 30):
    """Write config.json and float32 safetensors shards (with an index when more than one)."""
    from safetensors.numpy import save_file
    variables = {v.path: v for v in model.backbone.weights}
    shards, current, size = [], {}, 0
    for name, shape, path, transposed in weight_map(mc):
        value = variables[path].numpy()
        value = np.reshape(value, shape[::-1]).T if transposed else value
        current[name] = np.ascontiguousarray(value, dtype=np.float32)
        size += current[name].nbytes
        if size >= max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {}
    for name, tensors in zip(names, shards):
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        follow_umask(os.path.join(out_dir, name))  # safetensors writes it 0600
        index.update({t: name for t in tensors})
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(mc), f, indent=1)
