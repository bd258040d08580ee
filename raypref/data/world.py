"""The simulated preference world: prompts, responses with latent attributes, judges.

A response is an optional opener, ``verbosity`` content sentences, aspect markers and an
optional closer, all word-level text from `lexicon.py`. Each attribute shows in the words
(see ATTRIBUTES) and `World.judge` reads it back from any text. ``difficulty`` in [0, 1]
makes the four UltraFeedback-like aspects show only weakly and noisily in the wording,
makes the P-Soups attributes (verbosity, expertise, style) show a random level with
probability ``attribute_noise`` (default ``0.5 * difficulty``) and flips simulated choices
with probability ``label_noise`` (default ``0.25 * difficulty``); records always carry the
*latent* scores.

Pairs for any learner come from one path, `labelling.labelled_pairs` (World.labelled_pairs);
`World.quality` is the general-quality judge (`quality.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from raypref.data import lexicon
from raypref.data.labelling import labelled_pairs
from raypref.data.records import PreferenceRecord
from raypref.data.users import User, psoups_profile, psoups_profiles

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
ATTRIBUTES = ("verbosity", "expertise", "style") + ASPECTS
MAX_SENTENCES = 6
STYLE_LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
# P3C / P3D of P-Soups §B.2, only in a world built with extra_styles=True
EXTRA_STYLES = ("sass", "sarcasm")
EXTRA_STYLE_LEVELS = (0.0, 0.5, 1.0)
_EXTRA_PHRASES = {"sass": lexicon.SASS_PHRASES, "sarcasm": lexicon.SARCASM_PHRASES}
EXPERTISE_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
# style level -> (opener kind, closer kind), kinds index lexicon.OPENERS / CLOSERS
_STYLE_PHRASES = {-1.0: (-1, -1), -0.5: (-1, 0), 0.0: (0, 0), 0.5: (1, 0), 1.0: (1, 1)}
_TEST_FRACTION = 0.25
_LABEL_NOISE_PER_DIFFICULTY = 0.25
_ATTRIBUTE_NOISE_PER_DIFFICULTY = 0.5
# chosen / rejected values of pairs_for_preference: far apart so the judge agrees
_HIGH = {"expertise": (0.8, 1.0), "style": (0.5, 1.0), "sass": (0.75, 1.0), "sarcasm": (0.75, 1.0)}
_LOW = {"expertise": (0.0, 0.2), "style": (-1.0, -0.5), "sass": (0.0, 0.25), "sarcasm": (0.0, 0.25)}


@dataclass
class Response:
    text: str
    latent: dict[str, float]


class _Draws:
    """Uniform numbers from a numpy Generator, fetched in blocks: one numpy call per block
    instead of one per number keeps 10k pairs well under a second."""

    def __init__(self, rng: np.random.Generator, block: int = 96):
        self._rng, self._block, self._buf = rng, block, []

    def uniform(self) -> float:
        if not self._buf:
            self._buf = self._rng.random(self._block).tolist()
        return self._buf.pop()

    def index(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)

    def pick(self, seq: Sequence):
        return seq[self.index(len(seq))]


WORLD_SETTINGS = ("difficulty", "label_noise", "attribute_noise", "extra_styles")  # World's keyword arguments


class World:
    """Deterministic for (seed, difficulty); see the module docstring."""

    def __init__(self, seed: int = 0, difficulty: float = 0.0, label_noise: float | None = None,
                 attribute_noise: float | None = None, extra_styles: bool = False):
        for name, value in (("difficulty", difficulty), ("label_noise", label_noise),
                            ("attribute_noise", attribute_noise)):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"World: {name} must be in [0, 1], got {value}")
        self.seed, self.difficulty = int(seed), float(difficulty)
        # the sassy / sarcastic styles (P3C / P3D, P-Soups §B.2): off by default so the six-
        # preference world keeps its texts, vocabulary and random draws
        self.extra_styles = EXTRA_STYLES if extra_styles else ()
        self.attributes = ATTRIBUTES + self.extra_styles
        self.label_noise = float(_LABEL_NOISE_PER_DIFFICULTY * self.difficulty
                                 if label_noise is None else label_noise)
        self.attribute_noise = float(_ATTRIBUTE_NOISE_PER_DIFFICULTY * self.difficulty
                                     if attribute_noise is None else attribute_noise)
        self.topics = tuple(lexicon.TOPICS)
        self._build_judge_tables()
        self._check_lexicon()
        self._split_prompts()
        self._calibrate_verbosity()

    @classmethod
    def from_config(cls, cfg) -> "World":
        """The world a config describes: the one way jobs build it. ``cfg`` (an SFT, reward-data
        or other config) has ``world_seed`` and any of difficulty, label_noise, attribute_noise,
        extra_styles; the ones it lacks keep World's defaults."""
        if not hasattr(cfg, "world_seed"):
            raise TypeError(f"World.from_config: {type(cfg).__name__} has no world_seed field")
        settings = {name: getattr(cfg, name) for name in WORLD_SETTINGS if hasattr(cfg, name)}
        return cls(seed=cfg.world_seed, **settings)

    # ----- prompts -------------------------------------------------------------------
    def _split_prompts(self) -> None:
        pool = [f"{prefix} {template.format(t=topic)}".strip()
                for topic in self.topics for template in lexicon.PROMPT_TEMPLATES
                for prefix in lexicon.PROMPT_PREFIXES]
        order = np.random.default_rng(self.seed).permutation(len(pool))
        n_test = int(len(pool) * _TEST_FRACTION)
        self._prompts = {"test": [pool[i] for i in order[:n_test]],
                         "train": [pool[i] for i in order[n_test:]]}

    def prompts(self, n: int, split: str = "train") -> list[str]:
        """``n`` prompts of ``split`` ("train" or "test", disjoint); cycles past the pool."""
        pool = self.prompt_pool(split)
        return [pool[i % len(pool)] for i in range(n)]

    def prompt_pool(self, split: str = "train") -> list[str]:
        """All distinct prompts of ``split`` (a copy)."""
        if split not in self._prompts:
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        return list(self._prompts[split])

    def topic_of(self, prompt: str) -> str | None:
        """The first topic word in ``prompt``, or None."""
        for token in prompt.split():
            if token in lexicon.TOPICS:
                return token
        return None

    # ----- responses -----------------------------------------------------------------
    def sample_response(self, prompt: str, rng: np.random.Generator,
                        attrs: dict | None = None) -> Response:
        """A response to ``prompt``; ``attrs`` fixes some attributes, the rest are random."""
        return self._render(*self._draft(prompt, rng, attrs))

    def _draft(self, prompt: str, rng: np.random.Generator, attrs: dict | None = None):
        """Topic and attribute levels of a response, before any text is written (choices
        only need the latent scores, so rejected drafts never pay for rendering)."""
        topic = self.topic_of(prompt)
        if topic is None:
            raise ValueError(f"sample_response: prompt names no topic of this world: {prompt!r}")
        draws = _Draws(rng)
        return topic, self._levels(attrs or {}, draws), draws

    def candidates(self, prompt: str, k: int, rng: np.random.Generator) -> list[Response]:
        """``k`` independent random responses to ``prompt``."""
        return [self.sample_response(prompt, rng) for _ in range(k)]

    def _levels(self, attrs: dict, draws: _Draws) -> dict:
        unknown = set(attrs) - set(self.attributes)
        if unknown:
            raise ValueError(f"attrs: unknown attribute(s) {sorted(unknown)}; known: "
                             f"{self.attributes}")
        levels = {}
        v = attrs.get("verbosity")
        levels["sentences"] = 1 + (draws.index(MAX_SENTENCES) if v is None else
                                   int(_in_range("verbosity", v, 0, 1) * (MAX_SENTENCES - 1) + 0.5))
        e = attrs.get("expertise")
        levels["expertise"] = (draws.pick(EXPERTISE_LEVELS) if e is None
                               else _in_range("expertise", e, 0, 1))
        s = attrs.get("style")
        levels["style"] = (draws.pick(STYLE_LEVELS) if s is None else
                           min(STYLE_LEVELS, key=lambda lv: abs(lv - _in_range("style", s, -1, 1))))
        for aspect in ASPECTS:
            r = attrs.get(aspect)
            levels[aspect] = (1 + draws.index(5) if r is None
                              else int(_in_range(aspect, r, 1, 5) + 0.5))
        for name in self.extra_styles:
            x = attrs.get(name)
            levels[name] = (draws.pick(EXTRA_STYLE_LEVELS) if x is None else min(
                EXTRA_STYLE_LEVELS, key=lambda lv: abs(lv - _in_range(name, x, 0, 1))))
        return levels

    def _shown(self, level: int, draws: _Draws) -> int:
        """The aspect level the wording shows: the latent one, or at difficulty a neutral or
        random one (fewer markers, and markers unrelated to the latent rating)."""
        if draws.uniform() >= 0.8 * self.difficulty:
            return level
        return 3 if draws.uniform() < 0.5 else 1 + draws.index(5)

    def _shown_dimensions(self, levels: dict, draws: _Draws) -> dict:
        """The levels the wording shows for verbosity, expertise and style: each one is a
        random level with probability attribute_noise (no draws at all when it is 0, so an
        easy world's texts stay exactly as they were)."""
        if not self.attribute_noise:
            return levels
        shown = dict(levels)
        if draws.uniform() < self.attribute_noise:
            shown["sentences"] = 1 + draws.index(MAX_SENTENCES)
        if draws.uniform() < self.attribute_noise:
            shown["expertise"] = draws.pick(EXPERTISE_LEVELS)
        if draws.uniform() < self.attribute_noise:
            shown["style"] = draws.pick(STYLE_LEVELS)
        for name in self.extra_styles:
            if draws.uniform() < self.attribute_noise:
                shown[name] = draws.pick(EXTRA_STYLE_LEVELS)
        return shown

    def _render(self, topic: str, levels: dict, draws: _Draws) -> Response:
        latent = _latent(levels)
        levels = self._shown_dimensions(levels, draws)
        n = levels["sentences"]
        other = self.topics[(self.topics.index(topic) + 1 + draws.index(len(self.topics) - 1))
                            % len(self.topics)]
        shown = {a: self._shown(levels[a], draws) for a in ASPECTS}
        opener_kind, closer_kind = _STYLE_PHRASES[levels["style"]]
        fill = {"t": topic, "o": other}

        parts = [draws.pick(lexicon.OPENERS[opener_kind])]
        if "sass" in self.extra_styles:
            parts.append(draws.pick(lexicon.SASS_PHRASES[levels["sass"]]))
        parts.append(draws.pick(lexicon.ASPECT_MARKERS["instruction_following"][
            shown["instruction_following"]]).format(**fill))
        # at the lowest instruction-following level half the content drifts off-topic
        n_off = n // 2 if shown["instruction_following"] == 1 else 0
        n_special = _n_special(levels)
        special = _spread(n_special, 2 * n, draws)
        for i in range(n):
            subject = topic if i < n - n_off else other
            words = lexicon.TOPICS[subject]
            a = _topic_word(words, special[2 * i], draws)
            b = _topic_word(words, special[2 * i + 1], draws, avoid=a)
            parts.append(draws.pick(lexicon.CONTENT_FRAMES).format(t=subject, a=a, b=b))
        parts += self._truth_sentences(topic, shown["truthfulness"], draws)
        for aspect in ("helpfulness", "honesty"):
            parts.append(draws.pick(lexicon.ASPECT_MARKERS[aspect][shown[aspect]]).format(**fill))
        if "sarcasm" in self.extra_styles:
            parts.append(draws.pick(lexicon.SARCASM_PHRASES[levels["sarcasm"]]))
        parts.append(draws.pick(lexicon.CLOSERS[closer_kind]))

        return Response(" ".join(parts), latent)

    def _truth_sentences(self, topic: str, level: int, draws: _Draws) -> list[str]:
        n_true, n_false = lexicon.TRUTH_LAYOUT[level]
        words = lexicon.TOPICS[topic]
        out = [f"{fact} ." for fact in _pick_distinct(words.true_facts, n_true, draws)]
        out += [f"{fact} ." for fact in _pick_distinct(words.false_facts, n_false, draws)]
        if len(out) == 2 and draws.uniform() < 0.5:
            out.reverse()
        return out + [lexicon.TRUTH_FILLER] * (2 - len(out))

    # ----- judges --------------------------------------------------------------------
    def _build_judge_tables(self) -> None:
        # token -> (kind, value); kinds: simple/special/topic (value: topic),
        # friendly/unfriendly, key (value: (aspect, level))
        table: dict[str, tuple] = {}
        for topic, words in lexicon.TOPICS.items():
            table[topic] = ("topic", topic)
            table.update({w: ("simple", topic) for w in words.simple})
            table.update({w: ("special", topic) for w in words.specialist})
        table.update({w: ("friendly", None) for w in lexicon.FRIENDLY_KEYS})
        table.update({w: ("unfriendly", None) for w in lexicon.UNFRIENDLY_KEYS})
        table.update({w: ("sass", None) for w in lexicon.SASS_KEYS})
        table.update({w: ("sarcasm", None) for w in lexicon.SARCASM_KEYS})
        for aspect, keys in lexicon.ASPECT_KEYS.items():
            table.update({key: ("key", (aspect, level)) for level, key in keys.items()})
        self._token_kind = table
        self._facts = {topic: [(f" {fact} ", truth) for truth, facts in
                               ((True, words.true_facts), (False, words.false_facts))
                               for fact in facts]
                       for topic, words in lexicon.TOPICS.items()}

    def judge(self, text: str, prompt: str | None = None) -> dict[str, float]:
        """Scores of every attribute read from ``text`` (any text; unknown words are ignored).

        verbosity and expertise in [0, 1], style in [-1, 1], aspects in [1, 5]. With a
        ``prompt``, instruction_following also checks that the content is on its topic.
        """
        if not isinstance(text, str):
            raise TypeError(f"judge: text must be str, got {type(text).__name__}")
        tokens = text.split()
        simple = special = friendly = unfriendly = 0
        extra = {"sass": 0, "sarcasm": 0}
        topic_counts: dict[str, int] = {}
        levels_seen: set[tuple[str, int]] = set()
        for token in tokens:
            kind = self._token_kind.get(token)
            if kind is None:
                continue
            what, value = kind
            if what == "simple" or what == "special" or what == "topic":
                topic_counts[value] = topic_counts.get(value, 0) + 1
                simple += what == "simple"
                special += what == "special"
            elif what == "friendly":
                friendly += 1
            elif what == "unfriendly":
                unfriendly += 1
            elif what in extra:
                extra[what] += 1
            else:
                levels_seen.add(value)

        scores = {
            "verbosity": _clip((len(tokens) - self._words_at_min) / self._words_span, 0.0, 1.0),
            "expertise": special / (simple + special) if simple + special else 0.5,
            "style": _clip((friendly - unfriendly) / 4.0, -1.0, 1.0),
        }
        for aspect in lexicon.ASPECT_KEYS:
            shift = sum(level - 3 for a, level in levels_seen if a == aspect)
            scores[aspect] = _clip(3.0 + shift, 1.0, 5.0)
        scores["truthfulness"] = self._judge_truth(text, topic_counts)
        topic = self.topic_of(prompt) if prompt else None
        if topic is not None and topic_counts:
            on_topic = topic_counts.get(topic, 0) / sum(topic_counts.values())
            scores["instruction_following"] = (0.5 * scores["instruction_following"]
                                               + 0.5 * (1.0 + 4.0 * on_topic))
        for name in self.extra_styles:
            scores[name] = _clip(extra[name] / 2.0, 0.0, 1.0)
        return {name: float(scores[name]) for name in self.attributes}

    def _judge_truth(self, text: str, topic_counts: dict[str, int]) -> float:
        padded, shift = f" {text} ", 0
        for topic in topic_counts:  # a fact starts with its topic word
            for fact, truth in self._facts[topic]:
                if fact in padded:
                    shift += 1 if truth else -1
        return _clip(3.0 + shift, 1.0, 5.0)

    def verbosity_words(self) -> tuple[float, float]:
        """Word counts at which the verbosity judge reads 0 and 1 (it is clipped outside)."""
        return self._words_at_min, self._words_at_min + self._words_span

    def _calibrate_verbosity(self) -> None:
        """Word counts of typical 1- and 6-sentence responses anchor the verbosity judge."""
        rng = np.random.default_rng(12345)
        prompt = self._prompts["train"][0]
        noise, self.attribute_noise = self.attribute_noise, 0.0  # anchors are exact lengths

        def mean_words(v: float) -> float:
            return float(np.mean([len(self.sample_response(prompt, rng, {"verbosity": v})
                                      .text.split()) for _ in range(200)]))
        self._words_at_min = mean_words(0.0)
        self._words_span = mean_words(1.0) - self._words_at_min
        self.attribute_noise = noise

    # ----- simulated choices -----------------------------------------------------------
    def pairs_for_user(self, user: User, n: int, rng: np.random.Generator,
                       require_conflict_with: User | None = None,
                       split: str = "train") -> list[PreferenceRecord]:
        """``n`` pairs the user chose by utility over latent scores (exact ties skipped).

        With ``require_conflict_with``, pairs that both users order the same way, or that
        either ties, are dropped (Liu 2025 §3.5.1). Choices flip with probability label_noise.
        """
        for who in (user, require_conflict_with):
            if who is not None and set(who.weights) - set(self.attributes):
                raise ValueError(f"user {who.user_id} weighs unknown attribute(s) "
                                 f"{sorted(set(who.weights) - set(self.attributes))}")
        pool = self.prompt_pool(split)
        records: list[PreferenceRecord] = []
        for _ in range(_max_tries(n)):
            if len(records) == n:
                return records
            prompt = pool[int(rng.integers(len(pool)))]
            draft_a, draft_b = self._draft(prompt, rng), self._draft(prompt, rng)
            latent_a, latent_b = _latent(draft_a[1]), _latent(draft_b[1])
            margin = user.utility(latent_a) - user.utility(latent_b)
            if margin == 0:
                continue
            if require_conflict_with is not None:
                other = (require_conflict_with.utility(latent_a)
                         - require_conflict_with.utility(latent_b))
                if other == 0 or (other > 0) == (margin > 0):
                    continue
            a, b = self._render(*draft_a), self._render(*draft_b)
            better, worse = (a, b) if margin > 0 else (b, a)
            records.append(self._record(prompt, better, worse, rng, user.user_id, user.text,
                                        f"world:{user.group or 'user'}"))
        if len(records) < n:
            raise RuntimeError(f"pairs_for_user: user {user.user_id} gave only {len(records)} of "
                               f"{n} usable pairs in {_max_tries(n)} tries "
                               f"(weights {user.weights})")
        return records

    def pairs_for_preference(self, pref_name: str, n: int, rng: np.random.Generator,
                             split: str = "train") -> list[PreferenceRecord]:
        """``n`` pairs for one P-Soups preference (P-Soups Table 4): chosen is clearly better on
        that preference's dimension; the other attributes are random but equal in both."""
        profiles = psoups_profiles(extended=True)
        profile = psoups_profile(pref_name)
        user_id = 1 + [p.name for p in profiles].index(pref_name)
        pool = self.prompt_pool(split)
        records = []
        for _ in range(n):
            prompt = pool[int(rng.integers(len(pool)))]
            high, low = _clear_pair(profile.attribute, rng)
            # Both responses share the other attributes' (random) levels, as when one writer
            # answers twice under opposite instructions: the pair differs in this dimension,
            # so the preference is learnable from it without confounds.
            shared = self.sample_response(prompt, rng).latent
            a = self.sample_response(prompt, rng, {**shared, profile.attribute: high})
            b = self.sample_response(prompt, rng, {**shared, profile.attribute: low})
            better, worse = (a, b) if profile.direction > 0 else (b, a)
            records.append(self._record(prompt, better, worse, rng, user_id,
                                        profile.instruction, f"world:psoups:{pref_name}"))
        return records

    def labelled_pairs(self, labeller, n: int, seed, **kwargs) -> list[PreferenceRecord]:
        """The one pair path of every arm: see `raypref.data.labelling.labelled_pairs`."""
        return labelled_pairs(self, labeller, n, seed, **kwargs)

    def clear_pair(self, attribute: str, rng: np.random.Generator) -> tuple[float, float]:
        """(high, low) latent values of ``attribute`` far enough apart that the judge agrees."""
        return _clear_pair(attribute, rng)

    def quality(self, text: str, prompt: str) -> float:
        """General quality in [0, 1]: see `raypref.data.quality.quality`."""
        from raypref.data.quality import quality
        return quality(self, text, prompt).score

    def _record(self, prompt, better: Response, worse: Response, rng, user_id, user_text,
                source) -> PreferenceRecord:
        if self.label_noise and rng.random() < self.label_noise:
            better, worse = worse, better
        return PreferenceRecord(prompt, better.text, worse.text, user_id, user_text,
                                dict(better.latent), dict(worse.latent), source)

    # ----- SFT data and preference prompts ---------------------------------------------
    def preference_instruction(self, prefs: list[str]) -> str:
        """Word-level instruction text for a set of P-Soups preferences, e.g. ["P1A", "P3B"]."""
        if not prefs:
            raise ValueError("preference_instruction: prefs is empty")
        return " ".join(psoups_profile(name).instruction for name in prefs)

    def sft_corpus(self, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """(prompt, response) pairs over all attribute values; about 30% of prompts carry a
        preference instruction and their responses follow it."""
        pool = self.prompt_pool("train")
        names = [p.name for p in psoups_profiles(extended=bool(self.extra_styles))]
        styles = "ABCD" if self.extra_styles else "AB"
        corpus = []
        for _ in range(n):
            prompt = pool[int(rng.integers(len(pool)))]
            attrs: dict = {}
            if rng.random() < 0.3:
                if rng.random() < 0.5:  # a full combination, as P-MORL prompts have
                    prefs = [f"P1{'AB'[int(rng.integers(2))]}", f"P2{'AB'[int(rng.integers(2))]}",
                             f"P3{styles[int(rng.integers(len(styles)))]}"]
                else:
                    prefs = [names[int(rng.integers(len(names)))]]
                for name in prefs:
                    profile = psoups_profile(name)
                    high, low = _clear_pair(profile.attribute, rng)
                    attrs[profile.attribute] = high if profile.direction > 0 else low
                prompt = f"{prompt} {self.preference_instruction(prefs)}"
            corpus.append((prompt, self.sample_response(prompt, rng, attrs).text))
        return corpus

    def vocabulary(self) -> list[str]:
        """Every token a prompt, instruction or response of this world can contain (sorted)."""
        texts = list(lexicon.PROMPT_TEMPLATES) + list(lexicon.PROMPT_PREFIXES)
        texts += list(lexicon.CONTENT_FRAMES) + [lexicon.TRUTH_FILLER]
        texts += [p for phrases in (*lexicon.OPENERS.values(), *lexicon.CLOSERS.values())
                  for p in phrases]
        texts += [p for levels in lexicon.ASPECT_MARKERS.values() for ps in levels.values()
                  for p in ps]
        texts += [p.instruction for p in psoups_profiles(extended=bool(self.extra_styles))]
        if self.extra_styles:
            texts += [p for levels in _EXTRA_PHRASES.values() for ps in levels.values() for p in ps]
        for topic, words in lexicon.TOPICS.items():
            texts += [topic, *words.simple, *words.specialist, *words.true_facts,
                      *words.false_facts]
        tokens = {tok for text in texts for tok in text.split()}
        return sorted(tok for tok in tokens if not tok.startswith("{"))

    def _check_lexicon(self) -> None:
        """Each key / topic word must come from one place only, or the judges would misread."""
        seen: dict[str, str] = {}
        for topic, words in lexicon.TOPICS.items():
            for word in (topic, *words.simple, *words.specialist):
                if word in seen:
                    raise ValueError(f"lexicon: {word!r} is in both {seen[word]} and {topic}")
                seen[word] = topic
        phrases = [p for ph in (*lexicon.OPENERS.values(), *lexicon.CLOSERS.values()) for p in ph]
        phrases += [p for lv in lexicon.ASPECT_MARKERS.values() for ps in lv.values() for p in ps]
        phrases += list(lexicon.CONTENT_FRAMES) + [lexicon.TRUTH_FILLER]
        phrases += [f for w in lexicon.TOPICS.values() for f in (*w.true_facts, *w.false_facts)]
        phrases += [p for levels in _EXTRA_PHRASES.values() for ps in levels.values() for p in ps]
        for phrase in phrases:
            for token in phrase.split():
                kind = self._token_kind.get(token)
                if kind and kind[0] in ("simple", "special") or (
                        kind and kind[0] == "topic" and not phrase.startswith(token)):
                    raise ValueError(f"lexicon: topic word {token!r} inside phrase {phrase!r}")


def _n_special(levels: dict) -> int:
    """How many of the 2 words per content sentence are specialist words."""
    return int(levels["expertise"] * 2 * levels["sentences"] + 0.5)


def _latent(levels: dict) -> dict[str, float]:
    """The latent scores a response with these levels carries (what its words show at
    difficulty 0)."""
    n = levels["sentences"]
    latent = {"verbosity": (n - 1) / (MAX_SENTENCES - 1),
              "expertise": _n_special(levels) / (2 * n), "style": levels["style"]}
    latent.update({a: float(levels[a]) for a in ASPECTS})
    latent.update({k: float(levels[k]) for k in EXTRA_STYLES if k in levels})
    return latent


def _in_range(name: str, value, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"attrs[{name!r}] must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _clip(x: float, low: float, high: float) -> float:
    return low if x < low else high if x > high else x


def _spread(k: int, n: int, draws: _Draws) -> list[bool]:
    """A random length-n list with exactly k True (partial Fisher-Yates)."""
    flags = [True] * k + [False] * (n - k)
    for i in range(n - 1, 0, -1):
        j = draws.index(i + 1)
        flags[i], flags[j] = flags[j], flags[i]
    return flags


def _topic_word(words: lexicon.Topic, special: bool, draws: _Draws, avoid: str = "") -> str:
    pool = words.specialist if special else words.simple
    word = draws.pick(pool)
    return pool[(pool.index(word) + 1) % len(pool)] if word == avoid else word


def _pick_distinct(items: Sequence[str], k: int, draws: _Draws) -> list[str]:
    if k == 0:
        return []
    first = draws.index(len(items))
    return [items[first]] if k == 1 else [items[first], items[(first + 1) % len(items)]]


def _clear_pair(attribute: str, rng: np.random.Generator) -> tuple[float, float]:
    """(high, low) values of ``attribute`` far enough apart that the judge agrees."""
    if attribute == "verbosity":  # at least three sentences apart
        low = int(rng.integers(1, 4))
        high = int(rng.integers(low + 3, MAX_SENTENCES + 1))
        return (high - 1) / (MAX_SENTENCES - 1), (low - 1) / (MAX_SENTENCES - 1)
    (h0, h1), (l0, l1) = _HIGH[attribute], _LOW[attribute]
    return float(rng.uniform(h0, h1)), float(rng.uniform(l0, l1))


def _max_tries(n: int) -> int:
    return 50 * n + 1000
