"""A2A messages in, strands prompts out; strands results in, A2A messages and artifacts out. No I/O here.

A message whose one part is the data ``{"interrupt_responses": [...]}`` answers its context's interrupts.

A message of one text part is the prompt string itself (as ``{"prompt": "..."}`` over HTTP: the same request, the
same fingerprint). Other messages become content blocks: text parts as text, files with bytes as image, video or
document blocks by their MIME type (refused when the type is none of those Bedrock takes), files by URI and data
parts as text that names them (the agent sees the reference or the JSON; nothing is fetched).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from a2a.types import Artifact, DataPart, FilePart, FileWithBytes, Message, Part, Role, TextPart

from ..http._protocol import Invocation, ProblemError, parse_invocation
from ._errors import CONTENT_TYPE_NOT_SUPPORTED, RpcError, invalid_params

ANSWERS_FIELD = "interrupt_responses"

ANSWER_ARTIFACT = "answer"

_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_VIDEO_FORMATS = {
    "video/mp4": "mp4",
    "video/quicktime": "mov",
    "video/x-matroska": "mkv",
    "video/webm": "webm",
    "video/x-flv": "flv",
    "video/mpeg": "mpeg",
    "video/x-ms-wmv": "wmv",
    "video/3gpp": "three_gp",
}
_DOCUMENT_FORMATS = {
    "application/pdf": "pdf",
    "text/csv": "csv",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/html": "html",
    "text/plain": "txt",
    "text/markdown": "md",
}
# Bedrock's document names: letters, digits, single spaces, hyphens, parentheses and square brackets.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9\-()\[\] ]+")


def invocation_of(message: Message) -> Invocation:
    """What ``message`` asks: a prompt, or answers to its context's interrupts.

    A message whose one part is the data ``{"interrupt_responses": [{"interrupt_id", "response"}, ...]}`` answers
    interrupts (as HTTP's body of that name does); any other message is a prompt (``prompt_of``).

    Raises:
        RpcError: ``-32602`` malformed answers, or a prompt ``prompt_of`` refuses; ``-32005`` as ``prompt_of``.
    """
    parts = [part.root for part in message.parts]
    if len(parts) == 1 and isinstance(parts[0], DataPart) and set(parts[0].data) == {ANSWERS_FIELD}:
        try:
            return parse_invocation(parts[0].data)
        except ProblemError as e:
            raise invalid_params(e.problem.detail) from e
    return Invocation(prompt_of(message))


def prompt_of(message: Message) -> str | list[dict[str, Any]]:
    """The agent's prompt for ``message``.

    Raises:
        RpcError: ``-32602`` no content or bytes that are not base64; ``-32005`` a file of a type the model cannot
            take.
    """
    parts = [part.root for part in message.parts]
    if len(parts) == 1 and isinstance(parts[0], TextPart) and parts[0].text:
        return parts[0].text
    blocks = [block for part in parts if (block := _block_of(part)) is not None]
    if not blocks:
        raise invalid_params("The message has no content: send at least one non-empty part.")
    return blocks


def _block_of(part: TextPart | FilePart | DataPart) -> dict[str, Any] | None:
    if isinstance(part, TextPart):
        return {"text": part.text} if part.text else None
    if isinstance(part, DataPart):
        return {"text": json.dumps(part.data, sort_keys=True, ensure_ascii=False)}
    file = part.file
    mime = (file.mime_type or "").partition(";")[0].strip().lower()
    if not isinstance(file, FileWithBytes):
        return {"text": f"[file {file.name or ''} ({mime or 'unknown type'}) at {file.uri}]"}
    try:
        data = base64.b64decode(file.bytes, validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid_params("A file part's bytes are not valid base64.") from e
    if mime in _IMAGE_FORMATS:
        return {"image": {"format": _IMAGE_FORMATS[mime], "source": {"bytes": data}}}
    if mime in _VIDEO_FORMATS:
        return {"video": {"format": _VIDEO_FORMATS[mime], "source": {"bytes": data}}}
    if mime in _DOCUMENT_FORMATS:
        stem = (file.name or "").rpartition(".")[0] or file.name or ""
        name = " ".join(_NAME_UNSAFE.sub(" ", stem).split()) or "document"
        return {"document": {"format": _DOCUMENT_FORMATS[mime], "name": name, "source": {"bytes": data}}}
    raise RpcError(
        CONTENT_TYPE_NOT_SUPPORTED,
        "Incompatible content types",
        {"detail": f"Files of type {mime or '(none)'} are not supported: send images, videos or documents."},
    )


def answer_text(result: dict[str, Any]) -> str:
    """The text of a result body's final message (its text blocks, joined): what the answer artifact holds."""
    message = result.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return ""
    return "".join(block["text"] for block in content if isinstance(block, dict) and isinstance(block.get("text"), str))


def answer_artifact(result: dict[str, Any]) -> Artifact:
    """The task's answer: its text, and its structured output (a data part) when it has one."""
    parts = [Part(root=TextPart(text=answer_text(result)))]
    structured = result.get("structured_output")
    if isinstance(structured, dict):
        parts.append(Part(root=DataPart(data=structured)))
    return Artifact(artifact_id=ANSWER_ARTIFACT, name=ANSWER_ARTIFACT, parts=parts)


def text_artifact(text: str) -> Artifact:
    """A piece of the answer's text (a streamed chunk, or the text so far)."""
    return Artifact(artifact_id=ANSWER_ARTIFACT, name=ANSWER_ARTIFACT, parts=[Part(root=TextPart(text=text))])


def agent_message(text: str, task_id: str, context_id: str, message_id: str) -> Message:
    """A message of the agent in the task: its answer, or what happened to it."""
    return Message(
        role=Role.agent,
        parts=[Part(root=TextPart(text=text))],
        message_id=message_id,
        task_id=task_id,
        context_id=context_id,
    )
