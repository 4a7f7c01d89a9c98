"""`DirectRunner`: tasks by core request-reply, straight to an agent by name or capability."""

from __future__ import annotations

from chorus.client import ChorusClient
from chorus.errors import ConfigError
from chorus.messages import Result, Task


class DirectRunner:
    """Sends each task as one NATS request and waits for the reply.

    Nothing is queued: when no agent is running the task fails at once (NoResponders), and a
    task in flight when its agent dies fails with a timeout. The coordinator's durable
    dispatch is the runner for that. Each request waits up to `timeout` (default: the
    client's); a step's own `timeout` is enforced by the engine within that.
    """

    def __init__(self, client: ChorusClient, *, timeout: float | None = None) -> None:
        self.client = client
        self.timeout = timeout

    async def run(self, task: Task) -> Result:
        if task.agent:
            return await self.client.run_task(task, agent=task.agent, timeout=self.timeout)
        if task.capability:
            return await self.client.run_task(
                task, capability=task.capability, timeout=self.timeout
            )
        raise ConfigError(f"task {task.task_id} names neither an agent nor a capability")
