"""The offline model: deterministic, schema-aware, scriptable, and free of the openai package."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Literal

import msgspec

from chorus.llm import ModelRequest, create_model
from chorus.llm.factory import split_model
from chorus.llm.offline import OfflineModel
from chorus.messages import Usage


class Author(msgspec.Struct):
    name: str
    orcid: str | None = None


class Section(msgspec.Struct):
    heading: str
    words: int
    authors: list[Author]


class Report(msgspec.Struct, kw_only=True):
    title: str
    status: Literal["draft", "final"]
    score: float
    sections: list[Section]
    lead: Author
    tags: dict[str, str] = {}
    reviewed: bool = False


def ask(text: str = "hello world", schema: dict[str, Any] | None = None) -> ModelRequest:
    return ModelRequest(
        model="offline",
        instructions="Summarise the input.\nBe brief.",
        input=text,
        json_schema=schema,
    )


async def test_default_answer_is_deterministic() -> None:
    model = create_model("offline")

    first = await model.complete(ask())
    second = await create_model("offline").complete(ask())

    assert first.text == "[offline] Summarise the input.: hello world"
    assert second == first
    assert first.data is None
    assert first.model == "offline"


async def test_schema_sample_is_valid_for_a_nested_struct() -> None:
    schema = msgspec.json.schema(Report)

    reply = await OfflineModel().complete(ask(schema=schema))

    report = msgspec.convert(reply.data, Report)
    assert report.sections and report.sections[0].authors
    assert report.status == "draft"
    assert msgspec.json.decode(reply.text, type=Report) == report


async def test_script_hook_answers_with_text_or_data() -> None:
    def script(request: ModelRequest) -> Any:
        if request.json_schema is not None:
            return {"name": request.input.upper()}
        return f"scripted: {request.input}"

    model = OfflineModel(script=script)
    text = await model.complete(ask("ada"))
    data = await model.complete(ask("ada", schema=msgspec.json.schema(Author)))

    assert text.text == "scripted: ada"
    assert data.data == {"name": "ADA"}
    assert msgspec.json.decode(data.text) == {"name": "ADA"}
    assert [call.input for call in model.calls] == ["ada", "ada"]


async def test_async_script_text_is_parsed_when_a_schema_is_asked_for() -> None:
    async def script(request: ModelRequest) -> str:
        return '{"name": "grace"}'

    reply = await OfflineModel(script=script).complete(ask(schema=msgspec.json.schema(Author)))

    assert reply.data == {"name": "grace"}


async def test_usage_counts_words_of_prompt_and_answer() -> None:
    reply = await OfflineModel().complete(ask("one two three"))

    # "Summarise the input.\nBe brief." is 5 words; the answer has 7.
    assert reply.text == "[offline] Summarise the input.: one two three"
    assert reply.usage == Usage(input_tokens=8, output_tokens=7, total_tokens=15)


def test_model_strings_pick_the_provider() -> None:
    assert split_model("offline") == ("offline", "offline")
    assert split_model("offline:fast") == ("offline", "fast")
    assert split_model("openai:gpt-5-mini") == ("openai", "gpt-5-mini")
    assert split_model("gpt-5-mini") == ("openai", "gpt-5-mini")


def test_offline_model_does_not_import_openai() -> None:
    code = (
        "import chorus.llm, sys; chorus.llm.create_model('offline'); "
        "assert 'openai' not in sys.modules, 'openai was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
