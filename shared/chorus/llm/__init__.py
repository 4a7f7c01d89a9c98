"""Models: one interface (`Model`), an `offline` and an `openai` provider."""

from __future__ import annotations

from chorus.llm.base import Model, ModelEvent, ModelReply, ModelRequest, TextDelta
from chorus.llm.factory import create_model

__all__ = ["Model", "ModelEvent", "ModelReply", "ModelRequest", "TextDelta", "create_model"]
