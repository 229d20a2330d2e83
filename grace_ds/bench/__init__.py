"""The benchmarks as modules: scripts/ holds their thin entry points (python scripts/bench_gpu.py ...).

layers / model: the MoE layers and the whole model the GPU benchmark times; gpu_*: the GPU benchmark
(cases, links, timing, model + floor, command line); training, online, expert_compute, fault_drill,
report: the others; provenance: the commit, command and hardware every result JSON records.
"""
