"""The coordinator: registry from heartbeats, routing policy, durable dispatch, metrics."""
