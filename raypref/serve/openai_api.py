"""Answers of the OpenAI-compatible chat endpoint (``POST /v1/chat/completions``): a
``chat.completion`` object, or, with ``stream``, its ``chat.completion.chunk`` events as
server-sent events ending in ``data: [DONE]``.

The soups engine decodes a whole batch before it answers, so a stream sends its chunks once the
completion is done (one chunk per generated token): OpenAI clients read it as usual, without the
lower time to first token a truly incremental stream would give.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse

from raypref.serve.engine import GenerationResult


def chat_completion_body(result: GenerationResult, run: str, weights: dict[str, float], version: str,
                         prompt_tokens: int, eos_token_id: int | None, stream: bool, tokenizer):
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    ids = result.token_ids
    finish = "stop" if ids and ids[-1] == eos_token_id else "length"
    extra = {"weights": weights, "model_version": version, "served_by": result.served_by, "token_ids": ids}
    if not stream:
        return {"id": ident, "object": "chat.completion", "created": created, "model": run,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                          "total_tokens": prompt_tokens + len(ids)},
                "raypref": extra}
    return StreamingResponse(_events(ident, created, run, result.text, _pieces(tokenizer, ids, result.text),
                                     finish, extra), media_type="text/event-stream")


def _pieces(tokenizer, ids: list[int], text: str) -> list[str]:
    """The text as one piece per token (each the growth of the decoded prefix), joining to ``text``."""
    pieces, done = [], ""
    for n in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
        if prefix.startswith(done) and len(prefix) > len(done):
            pieces.append(prefix[len(done):])
            done = prefix
    if done != text:  # decoding by prefixes did not reproduce the text: send it whole
        return [text] if text else []
    return pieces


def _events(ident, created, run, text, pieces, finish, extra):
    def chunk(delta, finish_reason=None, **more):
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": run,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **more}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in pieces:
        yield chunk({"content": piece})
    yield chunk({}, finish, raypref=extra)
    yield "data: [DONE]\n\n"
