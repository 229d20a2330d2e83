"""Online re-planning in the simulator: entry point of grace_ds.bench.online_replanning (python scripts/online_replanning.py --help)."""
from grace_ds.bench.online_replanning import main

if __name__ == "__main__":
    main()
