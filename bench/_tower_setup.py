"""What the whole-tower pytest-benchmark runs share (test_bench_encoder.py, test_bench_training.py): the
GLM-4.1V tower in bf16 on a GPU; on a CPU the small tower in fp32 on scaled-down workloads (ratios only)."""
import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
SMALL = not GPU
ROUNDS = 10 if GPU else 3
SEED = 0
