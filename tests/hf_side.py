"""The Hugging Face side of the conversion tests, run as its own process (PyTorch and
TensorFlow stay out of each other's way):

    python tests/hf_side.py make HF_DIR '{"vocab_size": 97, ...}'   # random LlamaForCausalLM
    python tests/hf_side.py logits HF_DIR TOKENS.npy OUT.npy        # its fp32 logits
"""

import json
import sys

import numpy as np
import torch
import transformers


def make(hf_dir, spec):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(spec)))
    with torch.no_grad():  # random norm scales too, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(hf_dir, max_shard_size="50KB")  # several shards and an index


def logits(hf_dir, tokens, out):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        np.save(out, model(torch.tensor(np.load(tokens)).long()).logits.numpy())


if __name__ == "__main__":
    {"make": make, "logits": logits}[sys.argv[1]](*sys.argv[2:])
