"""What a training step costs without running it: ops counted on data-free tensors, priced on a device.

- :mod:`.counter`: a dispatch mode that records every op's FLOPs, bytes moved and category;
- :mod:`.trace`: one training step of a config traced on fake tensors, with the backends a CUDA
  run picks and the parallel setup (bf16 compute copies, FSDP, activation checkpointing) it uses;
- :mod:`.cost`: the per-category table, the predicted step time on a device, tiles/s and MFU;
- :mod:`.memory`: the step's memory (parameters, gradients, optimizer, teacher, activations) and the
  cheapest activation-checkpointing policy that fits a device.
"""
