"""A causal LM as judge in scoring mode (Liu 2025 §5.3.2): it rates ONE response at a time
against one preference text, so the order of two candidates cannot bias it.

The score of a response is its *expected rating*: the judge's next-token probabilities of the
five answers "1".."5" after the rating question, renormalized over those five, weighted by
their values. It is a number in [1, 5] that moves smoothly with the judge's confidence (a
sampled or argmax rating would tie far more often). For the aggregated win rate, each
preference of a combination is one judge score (`preference_table`), compared between the
two methods' responses with the usual tie tolerance.

Any causal LM works: the tiny word-level model (tests; its vocabulary must hold
`judge_vocabulary()`) or a Hugging Face id / folder named in `JudgeConfig.model`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from raypref.models.chat import has_chat_template, prompt_text
from raypref.models.factory import TINY, ModelConfig

RATINGS = ("1", "2", "3", "4", "5")
DEFAULT_TEMPLATE = (
    "you rate one answer for one user . user preference : {preference} question : {prompt} "
    "answer : {response} how well does the answer fit the user preference , from 1 "
    "( not at all ) to 5 ( fully ) ? rating :")


@dataclass
class JudgeConfig:
    """Which LM judges, and how it is asked."""
    model: str = TINY                   # "tiny", a Hugging Face id or a local folder
    template: str = DEFAULT_TEMPLATE    # must contain {preference}, {prompt} and {response}
    batch_size: int = 8
    dtype: str = "float32"
    tiny: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=1, n_embd=32, n_head=2))


def judge_vocabulary(template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Words of the template and the ratings, for the tiny word-level tokenizer."""
    words = template.replace("{preference}", " ").replace("{prompt}", " ").replace("{response}", " ")
    return sorted(set(words.split()) | set(RATINGS))


def preference_table(names: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Win-rate table for judge scores keyed by preference name (higher rating is better)."""
    return {name: (name, 1) for name in names}


class ScoringJudge:
    """Rates (preference, prompt, response) triples with a causal LM; see the module doc."""

    def __init__(self, model, tokenizer, template: str = DEFAULT_TEMPLATE, batch_size: int = 8):
        for slot in ("{preference}", "{prompt}", "{response}"):
            if slot not in template:
                raise ValueError(f"ScoringJudge: template lacks the slot {slot}")
        if batch_size < 1:
            raise ValueError(f"ScoringJudge: batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.batch_size = template, batch_size
        self.max_length = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 2048)
        unknown = [r for r in RATINGS if tokenizer.unk_token_id is not None
                   and tokenizer.unk_token_id in self._ids(" " + r)]
        if unknown:
            raise ValueError(f"ScoringJudge: the tokenizer cannot write the ratings {unknown}; "
                             "build the tiny one with judge_vocabulary() in its vocabulary")

    @classmethod
    def from_config(cls, cfg: JudgeConfig, vocabulary: Sequence[str] = ()) -> "ScoringJudge":
        """The judge of ``cfg``: a pretrained LM, or a tiny untrained one over ``vocabulary``
        plus the judge's own words (only good for tests of the machinery)."""
        from raypref.models.factory import build_policy, build_tokenizer

        if cfg.model == TINY:
            model_cfg = cfg.tiny
            tokenizer = build_tokenizer(model_cfg, list(vocabulary) + judge_vocabulary(cfg.template))
        else:
            model_cfg = ModelConfig(name_or_path=cfg.model, dtype=cfg.dtype)
            tokenizer = build_tokenizer(model_cfg)
        return cls(build_policy(model_cfg, tokenizer), tokenizer, cfg.template, cfg.batch_size)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, preference: str, prompt: str, response: str):
        """Token ids of the filled template and of each rating as its continuation (the ids
        the LM would see for "... rating : 3", where the tokenizer allows). A too long
        question loses its start, never the rating question at its end."""
        text = self.template.format(preference=preference, prompt=prompt, response=response)
        if has_chat_template(self.tokenizer):  # an instruct judge: asked in a user turn, answers as itself
            question = self._ids(prompt_text(self.tokenizer, text))
            answers = [self._ids(rating) for rating in RATINGS]
            return question[-(self.max_length - max(map(len, answers))):], answers
        question = self._ids(text)
        answers = []
        for rating in RATINGS:
            full = self._ids(f"{text} {rating}")
            ids = full[len(question):] if full[:len(question)] == question else self._ids(" " + rating)
            if not ids:
                raise ValueError(f"ScoringJudge: rating {rating!r} encodes to no token")
            answers.append(ids)
        keep = self.max_length - max(len(a) for a in answers)
        return question[-keep:], answers

    @torch.no_grad()
    def rate(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        """Expected rating in [1, 5] of each (preference, prompt, response)."""
        for i, item in enumerate(items):
            if len(item) != 3 or not all(isinstance(x, str) for x in item):
                raise TypeError(f"ScoringJudge.rate: item {i} must be (preference, prompt, "
                                f"response) strings, got {item!r}")
        scores: list[float] = []
        for start in range(0, len(items), self.batch_size):
            scores += self._rate_batch(items[start:start + self.batch_size])
        return scores

    def _rate_batch(self, items) -> list[float]:
        encoded = [self._encode(*item) for item in items]
        questions, answers = [q for q, _ in encoded], [a for _, a in encoded]
        if all(len(a) == 1 for ans in answers for a in ans):
            logprobs = self._single_token_logprobs(questions, answers)
        else:
            logprobs = self._sequence_logprobs(questions, answers)
        probs = torch.softmax(logprobs, dim=-1)  # over the five answers only
        values = torch.tensor([float(r) for r in RATINGS])
        return (probs @ values).tolist()

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Log-softmax logits of right-padded sequences (positions of the pads ignored)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _single_token_logprobs(self, questions, answers) -> torch.Tensor:
        logp = self._forward(questions)
        rows = []
        for i, (q, ans) in enumerate(zip(questions, answers)):
            rows.append(logp[i, len(q) - 1, [a[0] for a in ans]])
        return torch.stack(rows)

    def _sequence_logprobs(self, questions, answers) -> torch.Tensor:
        sequences = [q + a for q, ans in zip(questions, answers) for a in ans]
        logp = self._forward(sequences)
        out = torch.zeros(len(questions), len(RATINGS))
        for k, (q, ans) in enumerate(zip(questions, answers)):
            for j, a in enumerate(ans):
                row = logp[k * len(RATINGS) + j]
                out[k, j] = sum(row[len(q) - 1 + t, tok] for t, tok in enumerate(a))
        return out

    def scores(self, prompt: str, response: str, preferences: Mapping[str, str]) -> dict[str, float]:
        """{preference name: expected rating} of one response, e.g. for `win_rate`."""
        names = list(preferences)
        return dict(zip(names, self.rate([(preferences[n], prompt, response) for n in names])))
