"""Every subject, stream, bucket and queue-group name Chorus uses. Nothing else formats them."""

from __future__ import annotations

import re

import msgspec

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(\.>|\.\*)?$|^>$")


def check_token(value: str, what: str) -> str:
    """A single subject token: letters, digits, `-` and `_` only."""
    if not _TOKEN.match(value):
        from chorus.errors import ConfigError

        raise ConfigError(f"{what} {value!r} must use only letters, digits, '-' and '_'")
    return value


def check_topic(value: str) -> str:
    """An event topic: dot-separated tokens, optionally ending in a wildcard."""
    if not _TOPIC.match(value):
        from chorus.errors import ConfigError

        raise ConfigError(
            f"event topic {value!r} must be dot-separated tokens of letters, digits, '-' "
            "and '_', optionally ending in '.*' or '.>'"
        )
    return value


class Subjects(msgspec.Struct, frozen=True):
    """The subject space under one prefix (default `chorus`)."""

    prefix: str = "chorus"

    # request-reply
    def agent_task(self, instance: str) -> str:
        return f"{self.prefix}.agent.{instance}.task"

    def capability_task(self, capability: str) -> str:
        return f"{self.prefix}.cap.{capability}.task"

    def help(self, capability: str) -> str:
        return f"{self.prefix}.help.{capability}"

    def capability_queue(self, capability: str) -> str:
        return f"{self.prefix}-cap-{capability}"

    def help_queue(self, capability: str) -> str:
        return f"{self.prefix}-help-{capability}"

    # events
    def event(self, topic: str) -> str:
        return f"{self.prefix}.event.{topic}"

    def topic_of(self, subject: str) -> str:
        head = f"{self.prefix}.event."
        return subject[len(head) :] if subject.startswith(head) else subject

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.event.>"

    # heartbeats and registry
    def heartbeat(self, instance: str) -> str:
        return f"{self.prefix}.hb.{instance}"

    @property
    def all_heartbeats(self) -> str:
        return f"{self.prefix}.hb.*"

    def agent_status(self, instance: str, change: str) -> str:
        """Agent up/down/unhealthy notices, published by the coordinator."""
        return f"{self.prefix}.status.{instance}.{change}"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}.status.>"

    # durable dispatch
    def dispatch(self, capability: str) -> str:
        return f"{self.prefix}.dispatch.{capability}"

    @property
    def all_dispatch(self) -> str:
        return f"{self.prefix}.dispatch.>"

    def dead_letter(self, capability: str) -> str:
        return f"{self.prefix}.dlq.{capability}"

    @property
    def all_dead_letters(self) -> str:
        return f"{self.prefix}.dlq.>"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}.coordinator.metrics"

    # runs
    def run_submit(self) -> str:
        return f"{self.prefix}.runs.submit"

    def run_progress(self, run_id: str, kind: str) -> str:
        return f"{self.prefix}.run.{run_id}.{kind}"

    def run_all(self, run_id: str) -> str:
        return f"{self.prefix}.run.{run_id}.>"

    @property
    def all_runs(self) -> str:
        return f"{self.prefix}.run.>"

    def run_cancel(self, run_id: str) -> str:
        return f"{self.prefix}.runs.cancel.{run_id}"

    # JetStream names (no dots allowed)
    @property
    def _stem(self) -> str:
        return self.prefix.upper().replace("-", "_")

    @property
    def events_stream(self) -> str:
        return f"{self._stem}_EVENTS"

    @property
    def dispatch_stream(self) -> str:
        return f"{self._stem}_DISPATCH"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self._stem}_DLQ"

    @property
    def runs_stream(self) -> str:
        return f"{self._stem}_RUNS"

    @property
    def progress_stream(self) -> str:
        return f"{self._stem}_PROGRESS"

    def event_consumer(self, agent_name: str) -> str:
        """One durable consumer per agent name: replicas share it, so each event is seen once."""
        return f"agent-{agent_name}"

    @property
    def agents_bucket(self) -> str:
        return f"{self.prefix}-agents"

    @property
    def state_bucket(self) -> str:
        return f"{self.prefix}-state"

    @property
    def runs_bucket(self) -> str:
        return f"{self.prefix}-runs"

    @property
    def results_bucket(self) -> str:
        return f"{self.prefix}-results"

    @property
    def micro_service(self) -> str:
        return f"{self.prefix}-agent"
