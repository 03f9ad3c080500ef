"""The chat template: GPT-2 has none of its own, so chat messages become plain text.

Each message is a line `Role: content` (roles `System`, `User`, `Assistant`), messages are
separated by a blank line, and the prompt ends with `Assistant:` for the model to continue:

    System: You are terse.

    User: Hello!

    Assistant:

The reply ends where the model starts a new turn (`CHAT_STOP`), at EOS, or at `max_tokens`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:")


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise TypeError(f"messages[{i}].content must be a string or a list of text parts")


def chat_prompt(messages: list[Any]) -> str:
    """The prompt text for a list of OpenAI chat messages (`role`, `content`)."""
    if not messages:
        raise ConfigError("messages must not be empty")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ConfigError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        turns.append(f"{ROLES[role]}: {_content(message, i).strip()}")
    return "\n\n".join(turns) + "\n\nAssistant:"
