"""Benchmarks of Chorus against raw nats-py, run from the repository root as modules.

    python -m bench.routing          # routed tasks, direct and durable
    python -m bench.orchestration    # workflow runs through the orchestrator
    python -m bench.coordinator_load # the coordinator under 1,000 heartbeating instances
    python -m bench.agent_startup    # start-up time and idle memory of an agent process
    python -m bench.kv_contention    # shared-state increments on one hot key

Every script takes `--smoke` (the smallest sizes, to check it works). The shared harness
(processes, raw baselines, statistics, profiling, tables, flags) is `bench.harness`.
"""
