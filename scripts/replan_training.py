"""Re-planning a training run (grace_ds.bench.training_replan): python scripts/replan_training.py --help for its options."""
from grace_ds.bench.training_replan import main

if __name__ == "__main__":
    main()
