"""The memory benchmark's parts, by job (``benchmarks/bench_memory.py`` is the program):
``configs`` (the measured configurations), ``fakes`` (fake tensors and CUDA's autocast policy on
the CPU), ``quantized`` (quantized frozen bases), ``step`` (one training step, built through the
family registry) and ``report`` (overheads and tables)."""
