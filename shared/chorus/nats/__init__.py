"""NATS plumbing shared by every role: connecting, streams and buckets, the one JetStream
consumer, the one place that publishes and requests (`wire`), and the embedded server."""
