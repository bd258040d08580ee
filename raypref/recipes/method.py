"""What the registry holds for one method (`raypref.recipes.RECIPES`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PAIRS = "pairs"  # preference pairs: in memory or a Ray Data set, the experiment's choice
PROMPTS = "prompts"  # prompts and a reward (on-policy sampling)
USERS = "users"  # per-user preference pairs (personalized methods)
CORPUS = "corpus"  # (prompt, response) text


@dataclass(frozen=True)
class Method:
    """One method, as every job that runs it by name sees it.

    ``spec`` builds its LoopSpec. For a ``PAIRS`` method it is called as
    ``spec(section, base_dir, name=..., seed=..., pairs=[...])`` with pairs in memory, or with
    ``dataset="train", n_pairs=..., shuffle_buffer=...`` to stream a Ray Data set: the data
    source is the experiment's choice, not the method's.
    """

    name: str
    config: type  # its config section (a job config holds it in the field named by `section`)
    spec: Callable  # builds its LoopSpec (see above)
    loss: Callable  # its loss, a pure function in raypref.algos (testable alone)
    data: str = PAIRS  # what it learns from
    section: str = "training"  # the field of a job config (soups, preference job) that holds `config`
    # held-out scores of the trained model: (model, tokenizer, records, section, batch_size) -> {name: value}
    evaluate: Callable | None = None
    metric: str = ""  # the held-out score to maximize (a sweep's metric is eval.heldout_<metric>)
    summary: tuple[str, ...] = ()  # the per-step metrics a job's summary shows, in this order
    # Personalized Soups: (section, base_dir, preference, pairs, seed[, system]) -> the preference's
    # LoopSpec (``system``: the pairs' system text rule, recipes.dpo.SYSTEM_TEXTS, which a pair
    # method's and PPO's builders both take); None: soups cannot train it
    per_preference: Callable | None = None
    about: str = ""  # one line for --help and error messages

    def check_section(self, section, where: str) -> None:
        if not isinstance(section, self.config):
            raise ValueError(f"{where}: method {self.name!r} reads a {self.config.__name__} section, "
                             f"got {type(section).__name__}")
        section.validate(where)


def pair_method(name: str, config: type, spec_class: type, loss: Callable, about: str, metric: str,
                summary: tuple[str, ...] = (), **fixed) -> Method:
    """A method that learns a LoRA policy from preference pairs: its spec class (a
    `recipes.dpo.PairSpec`) builds it from either data source with ``from_config`` and scores
    held-out pairs with ``score_pairs``; Soups can train one per preference. ``fixed``: spec
    settings the method pins whatever its section says (IPO: loss_type="ipo")."""
    def spec(section, base_dir: str, **kwargs):
        return spec_class.from_config(section, base_dir, **kwargs, **fixed)

    def per_preference(section, base_dir: str, preference: str, pairs: list, seed: int, system: str = ""):
        return spec(section, base_dir, pairs=pairs, name=preference, seed=seed, system=system)

    return Method(name, config, spec, loss, PAIRS, evaluate=spec_class.score_pairs, metric=metric,
                  summary=summary, per_preference=per_preference, about=about)
