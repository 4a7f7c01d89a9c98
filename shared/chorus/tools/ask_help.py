"""`ask_help` as a tool: the model asks any agent with a capability, over NATS."""

from __future__ import annotations

from typing import Any

from chorus.errors import ChorusError, ToolFailed
from chorus.tools.base import ToolCallContext, ToolDefinition

HELP_TIMEOUT_S = 60.0


class AskHelpTool:
    """Sends a help request to the capability's queue group and returns the answer."""

    def __init__(self, timeout_s: float = HELP_TIMEOUT_S) -> None:
        self._definition = ToolDefinition(
            name="ask_help",
            description=(
                "Ask another agent of the team for help: any running agent with the given "
                "capability answers the question."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "question": {"type": "string", "description": "what to ask"},
                    "capability": {
                        "type": "string",
                        "description": "the capability of the agent to ask, e.g. research",
                    },
                },
                "required": ["question", "capability"],
                "additionalProperties": False,
            },
            timeout_s=timeout_s,
        )

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        question, capability = arguments.get("question"), arguments.get("capability")
        if not isinstance(question, str) or not isinstance(capability, str) or not capability:
            raise ToolFailed("ask_help needs a `question` and a `capability`, both strings")
        if ctx.client is None:
            raise ToolFailed("ask_help is not available here: the agent has no NATS client")
        try:
            reply = await ctx.client.ask_help(
                capability,
                question,
                requester=ctx.instance,
                run_id=ctx.run_id,
                timeout=self._definition.timeout_s,
            )
        except ChorusError as exc:  # NoHelper, a timeout, the helper's own failure
            raise ToolFailed(exc.reason) from None
        ctx.answered_by, ctx.usage = reply.instance, reply.usage
        return reply.answer if reply.data is None else {"answer": reply.answer, "data": reply.data}
