"""The orchestrator: takes submitted runs from the durable queue and drives them to the end."""
