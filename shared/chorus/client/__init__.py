"""The client layer: what any process (CLI, gateway, orchestrator, agents, your code) uses to
talk to a Chorus system — tasks and help requests, durable tasks, runs, and system reads.

Roles and the CLI reach buckets and queues only through these.
"""

from chorus.client.durable import TaskQueue
from chorus.client.runs import RunClient
from chorus.client.tasks import ChorusClient

__all__ = ["ChorusClient", "RunClient", "TaskQueue"]
