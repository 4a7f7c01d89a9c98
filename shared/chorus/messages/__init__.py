"""Every message on the wire, as msgspec Structs encoded to JSON, by concern.

`codec` (the base Struct, encode/decode), `headers` (every header), `agents` (the agent
protocol), `coordination` (registry, outcomes, dead letters, metrics), `state` (shared-state
entries), `sessions` (conversation sessions), `runs` (run records, progress, requests),
`effects` (the effect ledger), `discovery` (`$SRV.INFO` replies), `streams` (the live output
of tasks), `control` (human steps, resume, cancel markers, steer), `schema` (JSON Schema
of them all). This
package imports only `chorus.errors`, `chorus.subjects` and `chorus.specs`; the names are
re-exported here, so `from chorus.messages import Task` is the usual import.
"""

from chorus.messages import headers
from chorus.messages.agents import (
    AgentInfo,
    ErrorReply,
    Event,
    Heartbeat,
    HelpReply,
    HelpRequest,
    InstanceState,
    Result,
    Task,
    ToolCallRecord,
    decode_help,
    decode_result,
)
from chorus.messages.codec import (
    Message,
    Usage,
    decode,
    decode_any,
    encode,
    new_id,
    now,
)
from chorus.messages.control import (
    AnswerSource,
    HumanAnswer,
    HumanWait,
    RunControl,
    RunResume,
    SteerMessage,
    TimeoutAction,
)
from chorus.messages.coordination import (
    AgentMetrics,
    AgentRecord,
    AgentStatusChange,
    AttemptError,
    AttemptLog,
    BreakerState,
    DeadLetter,
    Health,
    MetricFamily,
    Metrics,
    MetricSample,
    StatusChange,
    TaskOutcome,
)
from chorus.messages.discovery import ServiceInfo
from chorus.messages.effects import EffectRecord, EffectStatus
from chorus.messages.headers import (
    ATTEMPT_HEADER,
    DEPTH_HEADER,
    MSG_ID_HEADER,
    RUN_ID_HEADER,
    SERVICE_ERROR_CODE_HEADER,
    SERVICE_ERROR_HEADER,
    TASK_ID_HEADER,
    TRACEPARENT_HEADER,
)
from chorus.messages.rejected import RejectedMessage, rejected
from chorus.messages.runs import (
    ENDED_STEP,
    FINISHED_RUN,
    DelegationPlan,
    PlanResults,
    ProgressKind,
    RunCancel,
    RunFields,
    RunHead,
    RunProgress,
    RunRecord,
    RunRequest,
    RunStatus,
    StepRecord,
    StepStatus,
    Subtask,
    SubtaskResult,
)
from chorus.messages.schema import (
    schemas,
    wire_types,
)
from chorus.messages.sessions import (
    Session,
    SessionInterrupt,
    SessionPolicy,
    TurnTicket,
)
from chorus.messages.state import (
    LockEntry,
    StateEntry,
)
from chorus.messages.streams import ChunkKind, StreamChunk, stream_key

__all__ = [
    "ATTEMPT_HEADER",
    "DEPTH_HEADER",
    "ENDED_STEP",
    "FINISHED_RUN",
    "MSG_ID_HEADER",
    "RUN_ID_HEADER",
    "SERVICE_ERROR_CODE_HEADER",
    "SERVICE_ERROR_HEADER",
    "TASK_ID_HEADER",
    "TRACEPARENT_HEADER",
    "AgentInfo",
    "AgentMetrics",
    "AgentRecord",
    "AgentStatusChange",
    "AnswerSource",
    "AttemptError",
    "AttemptLog",
    "BreakerState",
    "ChunkKind",
    "DeadLetter",
    "DelegationPlan",
    "EffectRecord",
    "EffectStatus",
    "ErrorReply",
    "Event",
    "Health",
    "Heartbeat",
    "HelpReply",
    "HelpRequest",
    "HumanAnswer",
    "HumanWait",
    "InstanceState",
    "LockEntry",
    "Message",
    "MetricFamily",
    "MetricSample",
    "Metrics",
    "PlanResults",
    "ProgressKind",
    "RejectedMessage",
    "Result",
    "RunCancel",
    "RunControl",
    "RunFields",
    "RunHead",
    "RunProgress",
    "RunRecord",
    "RunRequest",
    "RunResume",
    "RunStatus",
    "ServiceInfo",
    "Session",
    "SessionInterrupt",
    "SessionPolicy",
    "StateEntry",
    "StatusChange",
    "SteerMessage",
    "StepRecord",
    "StepStatus",
    "StreamChunk",
    "Subtask",
    "SubtaskResult",
    "Task",
    "TaskOutcome",
    "TimeoutAction",
    "ToolCallRecord",
    "TurnTicket",
    "Usage",
    "decode",
    "decode_any",
    "decode_help",
    "decode_result",
    "encode",
    "headers",
    "new_id",
    "now",
    "rejected",
    "schemas",
    "stream_key",
    "wire_types",
]
