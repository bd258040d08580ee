"""The text a policy reads: one place that turns (system text, prompt[, response]) into tokens.

A tokenizer with a chat template (an instruct LM such as SmolLM2) gets its own format: the
system text (a preference, a P-Soups combination instruction, a DPA direction) as the system
message, the prompt as the user message, the response as the assistant message; the response
starts right after the generation prompt, and special tokens are exactly those the rendered
template writes (no extra BOS). A tokenizer without one (the tiny word-level model) keeps
raypref's own format, ``"{prompt} <sep> {response}<eos>"``, and cannot take a system text.

A prompt is a text (one user turn) or a conversation: the ``{"role", "content"}`` messages
before the response (`PreferenceRecord.prompt_or_context`, own data with earlier turns or a
system message). A template renders each message as its own turn; the tiny format reads its
transcript (``data.records.render_context``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from raypref.data.records import render_context

SEP = "<sep>"
Prompt = str | Sequence[dict]  # a user turn's text, or the messages before the response


class Encoded(NamedTuple):
    """Token ids of prompt + response; the response (the tokens trained on) starts at n_prompt."""
    ids: list[int]
    n_prompt: int

    @property
    def response_mask(self) -> list[int]:
        return [0] * self.n_prompt + [1] * (len(self.ids) - self.n_prompt)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(prompt: str) -> str:
    """The tiny format's prompt text (the response follows after a space)."""
    return f"{prompt} {SEP}"


def _messages(tokenizer, prompt: Prompt, system: str | None) -> list[dict]:
    """The conversation before the response ([] for the tiny format)."""
    if not has_chat_template(tokenizer):
        if system is not None:
            raise ValueError(f"a system prompt ({system[:60]!r}) was given, but the tokenizer "
                             f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} "
                             "has no chat template to place it in; use an instruct model's "
                             "tokenizer, or write the text into the prompt")
        return []
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is None:
        return turns
    if turns and turns[0]["role"] == "system":
        raise ValueError(f"a system text ({system[:60]!r}) was given for a conversation that has its own "
                         f"system message ({turns[0]['content'][:60]!r}); keep one of them")
    return [{"role": "system", "content": system}] + turns


def _tiny_prompt(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else render_context(list(prompt))


def prompt_text(tokenizer, prompt: Prompt, system: str | None = None) -> str:
    """The text before the response: the rendered chat template up to and including the
    generation prompt, or the tiny format's ``"{prompt} <sep>"``. Tokenize it with
    ``add_special_tokens=False``: the template writes its special tokens itself."""
    messages = _messages(tokenizer, prompt, system)
    if not messages:
        return format_prompt(_tiny_prompt(prompt))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _response_text(tokenizer, prompt: Prompt, response: str, system: str | None, shown: str) -> str:
    messages = _messages(tokenizer, prompt, system)
    if not messages:
        return " " + response  # the eos is added as a token id, never as text
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(shown):
        raise ValueError("the chat template renders a conversation with a response differently "
                         "from its generation prompt (e.g. it rewrites earlier turns), so the "
                         f"response cannot be separated: {full[:200]!r}")
    return full[len(shown):]


def encode_chat(tokenizer, prompt: Prompt, response: str = "", system: str | None = None,
                max_length: int | None = None) -> Encoded:
    """Token ids of the prompt (with system text; a text or the messages before the response)
    and response, and where the response starts.

    Prompt and response are tokenized apart, so the prompt's ids are exactly those generation
    starts from. Chat template: the response is the template's assistant turn (with its end
    token). Tiny format: the response is followed by eos. Longer than max_length: the prompt
    keeps its last max_length // 2 tokens, then the response is cut (losing its end token).
    """
    shown = prompt_text(tokenizer, prompt, system)
    prompt_ids = tokenizer(shown, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(_response_text(tokenizer, prompt, response, system, shown),
                             add_special_tokens=False)["input_ids"]
    if not has_chat_template(tokenizer):
        response_ids = response_ids + [tokenizer.eos_token_id]
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[-(max_length // 2):]
        response_ids = response_ids[:max_length - len(prompt_ids)]
    return Encoded(prompt_ids + response_ids, len(prompt_ids))
