"""hvd_llama: LLaMA training in Keras 3 over Horovod ring-allreduce. See README.md."""
