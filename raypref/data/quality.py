"""General quality of a text in the simulated world (the helpfulness check of P-Soups Fig. 2).

Independent of the preference attributes (length, expertise, style), so a policy cannot buy
quality by moving them. Four parts, each in [0, 1], multiplied so any one failure sinks the
score:

- ``well_formed``: share of sentences that are sentences of the world's grammar (an opener,
  closer, marker, content frame or fact with its slots filled by topic words); a trailing
  fragment without end mark counts as a bad sentence;
- ``distinct``: distinct sentences / sentences (repetition sinks it);
- ``on_topic``: share of topic words that belong to the prompt's topic (0 with none at all:
  a text that never touches a topic answers nothing);
- ``factual``: true facts / facts stated (1 when none is stated).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from raypref.data import lexicon

_END_MARKS = frozenset({".", "!", "?"})
_TOPIC_SLOTS = ("{t}", "{o}")
_WORD_SLOTS = ("{a}", "{b}")


@dataclass(frozen=True)
class Quality:
    well_formed: float
    distinct: float
    on_topic: float
    factual: float

    @property
    def score(self) -> float:
        return self.well_formed * self.distinct * self.on_topic * self.factual


def _sentences(tokens: list[str]) -> list[tuple[str, ...]]:
    out, current = [], []
    for token in tokens:
        current.append(token)
        if token in _END_MARKS:
            out.append(tuple(current))
            current = []
    if current:
        out.append(tuple(current))  # an unfinished fragment (no end mark): never matches
    return out


@lru_cache(maxsize=1)
def _grammar() -> dict[int, list[tuple[str, ...]]]:
    """Sentence patterns of the lexicon by length; slots stay as "{t}" / "{a}" tokens."""
    phrases = [p for group in (*lexicon.OPENERS.values(), *lexicon.CLOSERS.values())
               for p in group]
    phrases += [p for levels in lexicon.ASPECT_MARKERS.values() for group in levels.values()
                for p in group]
    phrases += [p for kind in (lexicon.SASS_PHRASES, lexicon.SARCASM_PHRASES)
                for group in kind.values() for p in group]
    phrases += list(lexicon.CONTENT_FRAMES) + [lexicon.TRUTH_FILLER]
    phrases += [f"{fact} ." for words in lexicon.TOPICS.values()
                for fact in (*words.true_facts, *words.false_facts)]
    patterns: dict[int, list[tuple[str, ...]]] = {}
    for phrase in phrases:
        for sentence in _sentences(phrase.split()):
            patterns.setdefault(len(sentence), []).append(sentence)
    return patterns


@lru_cache(maxsize=1)
def _words() -> tuple[frozenset, frozenset, dict]:
    topics = frozenset(lexicon.TOPICS)
    words = frozenset(w for t in lexicon.TOPICS.values() for w in (*t.simple, *t.specialist))
    facts = {tuple(f"{fact} .".split()): truth for t in lexicon.TOPICS.values()
             for truth, group in ((True, t.true_facts), (False, t.false_facts)) for fact in group}
    return topics, words, facts


def _matches(sentence: tuple[str, ...], pattern: tuple[str, ...], topics, words) -> bool:
    for token, slot in zip(sentence, pattern):
        if slot in _TOPIC_SLOTS:
            if token not in topics:
                return False
        elif slot in _WORD_SLOTS:
            if token not in words:
                return False
        elif token != slot:
            return False
    return True


def quality(world, text: str, prompt: str) -> Quality:
    """The four quality parts of ``text`` as an answer to ``prompt`` (see the module doc)."""
    if not isinstance(text, str):
        raise TypeError(f"quality: text must be str, got {type(text).__name__}")
    topic = world.topic_of(prompt)
    if topic is None:
        raise ValueError(f"quality: prompt names no topic of this world: {prompt!r}")
    topics, words, facts = _words()
    sentences = _sentences(text.split())
    if not sentences:
        return Quality(0.0, 0.0, 0.0, 1.0)
    grammar = _grammar()
    good = sum(any(_matches(s, p, topics, words) for p in grammar.get(len(s), ()))
               for s in sentences)
    stated = [facts[s] for s in sentences if s in facts]
    own = other = 0
    for token in text.split():
        kind = world._token_kind.get(token)
        if kind and kind[0] in ("simple", "special", "topic"):
            own += kind[1] == topic
            other += kind[1] != topic
    return Quality(
        well_formed=good / len(sentences),
        distinct=len(set(sentences)) / len(sentences),
        on_topic=own / (own + other) if own + other else 0.0,
        factual=sum(stated) / len(stated) if stated else 1.0,
    )
