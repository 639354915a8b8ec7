"""OpenAI streamed chunks assembled into the object a non-streamed request would have returned.

A `chat.completion.chunk` stream becomes a `chat.completion`, a `text_completion` stream a
`text_completion`, as vLLM, llama.cpp and OpenAI shape their non-streamed answers:

- `id`, `created`, `model` from the first chunk that has them, `system_fingerprint` the last
  one sent (only when sent);
- per choice `index` (n > 1 streams interleave them), in index order: chat's `message` with the
  `role` of its first delta (`assistant` by default), `content` joined from the deltas (None when
  no delta carried text, or when only tool calls came, as non-streamed answers say it),
  `tool_calls` merged by their index (id and type as first sent, the function's `name` and
  `arguments` concatenated), `refusal`, `reasoning_content` and `reasoning` (vLLM's and
  llama.cpp's reasoning models) joined when sent, the legacy `function_call` merged likewise;
  completions' `text` joined; `finish_reason` the last one sent; `logprobs` joined list by
  list when sent, else None;
- `usage` from the last chunk that carried one (llama.cpp sends it with the finish reason,
  vLLM and OpenAI in a last chunk without choices, asked by `stream_options.include_usage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A delta's strings that join across chunks into the message's field of the same name.
JOINED_FIELDS = ("refusal", "reasoning_content", "reasoning")
TOP_FIELDS = ("id", "created", "model")


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str | None = None
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    def add(self, delta: dict[str, Any]) -> None:
        self.id = self.id or delta.get("id")
        self.type = self.type or delta.get("type")
        function = delta.get("function") or {}
        if isinstance(function, dict):
            _append(self.name, function.get("name"))
            _append(self.arguments, function.get("arguments"))

    def value(self) -> dict[str, Any]:
        function = {"name": "".join(self.name), "arguments": "".join(self.arguments)}
        return {"id": self.id, "type": self.type or "function", "function": function}


@dataclass(slots=True)
class _Choice:
    index: int
    role: str | None = None
    content: list[str] = field(default_factory=list)
    has_content: bool = False
    joined: dict[str, list[str]] = field(default_factory=dict)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    function_call: _ToolCall | None = None
    finish_reason: Any = None
    logprobs: dict[str, list[Any]] | None = None

    def add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        joined = self.logprobs if self.logprobs is not None else {}
        for key, values in logprobs.items():
            if isinstance(values, list):
                joined.setdefault(key, []).extend(values)
        self.logprobs = joined

    def add_delta(self, delta: dict[str, Any]) -> None:
        self.role = self.role or delta.get("role")
        text = delta.get("content")
        if isinstance(text, str):
            self.has_content = True
            self.content.append(text)
        for name in JOINED_FIELDS:
            if isinstance(delta.get(name), str):
                self.joined.setdefault(name, []).append(delta[name])
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                index = call.get("index")
                if not isinstance(index, int):  # no index: a new call when it has an id
                    index = (
                        len(self.tool_calls)
                        if call.get("id") or not self.tool_calls
                        else max(self.tool_calls)
                    )
                self.tool_calls.setdefault(index, _ToolCall()).add(call)
        if isinstance(delta.get("function_call"), dict):
            self.function_call = self.function_call or _ToolCall()
            self.function_call.add({"function": delta["function_call"]})

    def message(self) -> dict[str, Any]:
        content: str | None = "".join(self.content) if self.has_content else None
        if self.tool_calls and not content:
            content = None
        message: dict[str, Any] = {"role": self.role or "assistant", "content": content}
        for name, parts in self.joined.items():
            message[name] = "".join(parts)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].value() for i in sorted(self.tool_calls)]
        if self.function_call is not None:
            message["function_call"] = self.function_call.value()["function"]
        return message


class Assembler:
    """Chunks in (`add`), in the order they came; the assembled object out (`result`).

    `operation`: `chat.completions` or `completions`. `finished`: some choice has a finish
    reason, which is how a stream that ends without `[DONE]` may still have ended right.
    """

    def __init__(self, operation: str) -> None:
        self.chat = operation != "completions"
        self.finished = False
        self._top: dict[str, Any] = {}
        self._fingerprint: Any = None
        self._usage: Any = None
        self._choices: dict[int, _Choice] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        for name in TOP_FIELDS:
            if self._top.get(name) is None and chunk.get(name) is not None:
                self._top[name] = chunk[name]
        if chunk.get("system_fingerprint") is not None:
            self._fingerprint = chunk["system_fingerprint"]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index")
        index = index if isinstance(index, int) else 0
        assembled = self._choices.setdefault(index, _Choice(index))
        if self.chat:
            delta = choice.get("delta")
            if isinstance(delta, dict):
                assembled.add_delta(delta)
        elif isinstance(choice.get("text"), str):
            assembled.content.append(choice["text"])
        if choice.get("finish_reason") is not None:
            assembled.finish_reason = choice["finish_reason"]
            self.finished = True
        assembled.add_logprobs(choice.get("logprobs"))

    def result(self) -> dict[str, Any]:
        """The non-streamed equivalent of the chunks added so far."""
        result: dict[str, Any] = {
            "id": self._top.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self._top.get("created"),
            "model": self._top.get("model"),
        }
        if self._fingerprint is not None:
            result["system_fingerprint"] = self._fingerprint
        result["choices"] = [self._choice(self._choices[i]) for i in sorted(self._choices)]
        if self._usage is not None:
            result["usage"] = self._usage
        return result

    def _choice(self, choice: _Choice) -> dict[str, Any]:
        body: dict[str, Any] = {"index": choice.index}
        if self.chat:
            body["message"] = choice.message()
        else:
            body["text"] = "".join(choice.content)
        body["logprobs"] = choice.logprobs
        body["finish_reason"] = choice.finish_reason
        return body


def _append(parts: list[str], value: Any) -> None:
    if isinstance(value, str):
        parts.append(value)
