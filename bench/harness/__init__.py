"""What every benchmark script shares: one harness instead of one per script.

- `fleet`: the embedded nats-server and the Chorus child processes of a run (coordinator,
  orchestrator, agents), their environment, start-up and shutdown;
- `baselines`: raw nats-py request-reply and JetStream work-queue figures, measured in the
  same run as the Chorus figures they are compared with;
- `stats`: latency figures, percentiles, the sequential and in-flight measuring loops;
- `profile`: CPU of every process by role, the server's message counters, py-spy;
- `tap`: a bare-socket process that timestamps every message on the wire;
- `tables`: Markdown tables and the machine and version lines;
- `cli`: the common flags (`--smoke`, `--keep`, `--trace`, `--repeat`, `--profile`).
"""
