"""Test-session settings."""

import torch

# Tiny tensors: one intra-op thread is as fast as two on an idle 2-core machine, and far faster
# when other processes share the cores (OpenMP threads then wait for each other).
torch.set_num_threads(1)
