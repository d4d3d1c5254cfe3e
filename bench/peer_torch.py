"""A peer for bench/peers.py, run by the peers' own virtualenv: transformers' LlamaForCausalLM
in PyTorch eager mode on random tokens, one process, or under torchrun with
DistributedDataParallel over Gloo (the peer most LLaMA users would pick). Prints
{"tokens_per_s": ...} on rank 0.

    python bench/peer_torch.py --spec JSON [--steps 3] [--threads T]
    torchrun --nproc-per-node N bench/peer_torch.py --spec JSON ...
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

import peer_common
from peer_common import WARMUP


def main():
    args = peer_common.parser(__doc__).parse_args()
    s = args.spec
    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)  # the same initial weights everywhere, as DDP expects
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_dim"],
        intermediate_size=s["intermediate_dim"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_query_heads"], num_key_value_heads=s["num_key_value_heads"],
        max_position_embeddings=s["seq_len"], tie_word_embeddings=False))
    model.train()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], weight_decay=0.1)
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, s["vocab_size"], (s["global_batch"] // world, s["seq_len"] + 1),
                           generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits  # [b, seq_len, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as hvd_llama's configs do
        optimizer.step()
        return loss.item()

    for _ in range(WARMUP):
        step()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    if rank == 0:
        peer_common.report(args, seconds)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
