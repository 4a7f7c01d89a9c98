"""The `tools:` entries of an agent spec, decoded and checked; building them is the agent's job.

    tools:
      - ask_help                                   # ask any agent with a capability
      - python: chorus.examples.tools:define       # a Python function (`@tool`)
      - capability: research                       # agents with a capability, as one tool
        durable: true
        description: Finds facts and sources
      - agent: writer                              # one agent by name, as a tool
      - mcp: {command: uvx, args: [mcp-server-fetch]}
        prefix: fetch
      - mcp: {url: "https://mcp.example.com/mcp", headers: {Authorization: "Bearer ..."}}
      - hosted: web_search                         # a provider tool, passed through
      - hosted: {type: web_search, search_context_size: low}
      - python: mycompany.tools:charge             # a person decides before it runs
        approval: "args.amount > 100"              # or `required`
        approval_edit: true                        # the decider may change the arguments
        approval_timeout_s: 3600                   # then `approval_on_timeout` (reject)

Each mapping has exactly one kind key (`python`, `capability`, `agent`, `mcp`, `hosted`);
the other keys must belong to that kind; the `approval*` keys go with any kind but `hosted`
(see `ApprovalPolicy`). Errors are `InvalidSpec` (a ValueError), so a spec
file's error names the entry's path and line.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from chorus.errors import ConfigError, ExpressionError, InvalidSpec
from chorus.specs.expressions import parse
from chorus.subjects import check_token

ToolKind = Literal["ask_help", "python", "capability", "agent", "mcp", "hosted"]
KINDS: tuple[ToolKind, ...] = ("python", "capability", "agent", "mcp", "hosted")
# Which optional keys each kind takes besides its own.
_OPTIONS: dict[str, frozenset[str]] = {
    "python": frozenset(),
    "capability": frozenset({"durable", "description"}),
    "agent": frozenset({"durable", "description"}),
    "mcp": frozenset({"prefix"}),
    "hosted": frozenset(),
}
_DEFAULTS: dict[str, Any] = {"durable": True, "description": "", "prefix": ""}
REQUIRED: Final = "required"
TimeoutAction = Literal["reject", "approve"]


class ApprovalPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When a person must decide on a call before the tool runs (chorus.client.approvals).

    `when` is `required` (every call) or an expression of the workflow language over the
    call's arguments, named `args` (`args.amount > 100`). `edit`: the decider may replace the
    arguments. `timeout_s`: how long the decision may take (None: CHORUS_APPROVAL_TIMEOUT);
    then `on_timeout` is applied.
    """

    when: str = REQUIRED
    edit: bool = False
    timeout_s: float | None = None
    on_timeout: TimeoutAction = "reject"

    def __post_init__(self) -> None:
        if not self.when.strip():
            raise InvalidSpec('`approval` must be "required" or a condition such as "args.x > 1"')
        if self.when != REQUIRED:
            try:
                expression = parse(self.when)
            except ExpressionError as exc:
                raise InvalidSpec(
                    f"`approval` is {REQUIRED!r} or an expression over `args`: {exc.reason}"
                ) from None
            unknown = expression.names() - {"args"}
            if unknown:
                raise InvalidSpec(
                    f"`approval` condition {self.when!r} may name only `args` (the call's "
                    f"arguments), not {', '.join(sorted(unknown))}"
                )
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise InvalidSpec(f"`approval_timeout_s` must be positive, got {self.timeout_s}")

    def needed(self, arguments: dict[str, Any]) -> tuple[bool, str]:
        """Whether this call needs a decision, and why (a condition that cannot be evaluated
        needs one, and the reason says what failed)."""
        if self.when == REQUIRED:
            return True, "approval: required"
        try:
            if parse(self.when).is_true({"args": arguments}):
                return True, f"approval: {self.when}"
        except ExpressionError as exc:
            return True, f"approval condition failed, so a decision is asked: {exc.reason}"
        return False, ""


class McpServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An MCP server: a command to spawn (stdio), or a URL (streamable HTTP)."""

    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    url: str | None = None
    headers: dict[str, str] = {}

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise InvalidSpec("an mcp server needs exactly one of `command` (stdio) or `url`")
        if self.command is not None and self.headers:
            raise InvalidSpec("`headers` are for an mcp `url`, not a `command`")
        if self.url is not None and (self.args or self.env):
            raise InvalidSpec("`args` and `env` are for an mcp `command`, not a `url`")


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One mapping entry of `tools:`."""

    python: str | None = None  # package.module:function
    capability: str | None = None
    agent: str | None = None
    mcp: McpServer | None = None
    hosted: str | dict[str, Any] | None = None
    durable: bool = True
    description: str = ""
    prefix: str = ""
    approval: str | None = None  # "required" or a condition over `args`
    approval_edit: bool = False
    approval_timeout_s: float | None = None
    approval_on_timeout: TimeoutAction = "reject"

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise InvalidSpec(f"a tool entry needs exactly one of {', '.join(KINDS)} ({found})")
        kind = given[0]
        for option, default in _DEFAULTS.items():
            if getattr(self, option) != default and option not in _OPTIONS[kind]:
                raise InvalidSpec(f"`{option}` does not apply to a {kind} tool")
        for name, what in ((self.capability, "capability"), (self.agent, "agent name")):
            if name is not None:
                try:
                    check_token(name, what)
                except ConfigError as exc:
                    raise InvalidSpec(exc.reason) from None
        if self.python is not None:
            module, _, function = self.python.partition(":")
            if not module or not function:
                raise InvalidSpec(
                    f"python tool {self.python!r} must look like package.module:function"
                )
        if isinstance(self.hosted, dict) and not isinstance(self.hosted.get("type"), str):
            raise InvalidSpec("a hosted tool given as a mapping needs a `type`, e.g. web_search")
        if self.hosted == "":
            raise InvalidSpec("a hosted tool needs a type, e.g. web_search")
        self.approval_policy  # noqa: B018 (checks the approval keys)

    @property
    def approval_policy(self) -> ApprovalPolicy | None:
        """The entry's `approval*` keys as a policy; None when no decision is ever needed."""
        extras = (
            self.approval_edit,
            self.approval_timeout_s is not None,
            self.approval_on_timeout != "reject",
        )
        if self.approval is None:
            if any(extras):
                raise InvalidSpec("`approval_edit`, `_timeout_s` and `_on_timeout` need `approval`")
            return None
        if self.hosted is not None:
            raise InvalidSpec("`approval` does not apply to a hosted tool (the provider runs it)")
        return ApprovalPolicy(
            when=self.approval,
            edit=self.approval_edit,
            timeout_s=self.approval_timeout_s,
            on_timeout=self.approval_on_timeout,
        )

    @property
    def kind(self) -> ToolKind:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @property
    def hosted_tool(self) -> dict[str, Any]:
        """The hosted tool as the provider takes it: `{"type": ..., ...}`."""
        if isinstance(self.hosted, dict):
            return dict(self.hosted)
        return {"type": self.hosted}


ToolEntry = Literal["ask_help"] | ToolSpec


def kind_of(entry: ToolEntry) -> ToolKind:
    return "ask_help" if isinstance(entry, str) else entry.kind
