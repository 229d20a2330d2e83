"""Expert-compute benchmark entry point (grace_ds.bench.expert_compute): python scripts/bench_expert_compute.py --help for its options."""
from grace_ds.bench.expert_compute import main

if __name__ == "__main__":
    main()
