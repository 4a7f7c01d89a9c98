"""Observability: OpenTelemetry spans (`tracing`), Prometheus metrics (`metrics`), and
switching trace export on from the environment (`setup`). Trace context travels in NATS
headers through `chorus.nats.propagation`, which `chorus.nats.wire` calls on every send."""
