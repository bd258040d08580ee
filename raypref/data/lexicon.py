"""The closed word-level lexicon of the simulated world (data only, no logic).

Every text the world writes is lowercase words and punctuation tokens joined by single
spaces, built from the strings below. Placeholders: ``{t}`` the prompt's topic, ``{o}``
another topic, ``{a}``/``{b}`` topic words. Each attribute has its own *key tokens*
that appear nowhere else, so the judges in `world.py` can read the attribute back from
any text by counting tokens (the world checks this at construction).
"""
from __future__ import annotations

from typing import NamedTuple


class Topic(NamedTuple):
    simple: tuple[str, ...]       # elementary words
    specialist: tuple[str, ...]   # words only an expert would use
    true_facts: tuple[str, ...]
    false_facts: tuple[str, ...]


TOPICS: dict[str, Topic] = {
    "bees": Topic(("honey", "flowers", "buzz", "hive", "wings"),
                  ("pollination", "pheromones", "apiculture", "thorax", "eusocial"),
                  ("bees have six legs", "bees make wax"),
                  ("bees have eight legs", "bees make soap")),
    "volcanoes": Topic(("lava", "fire", "mountain", "smoke", "ash"),
                       ("magma", "pyroclastic", "caldera", "tectonic", "basalt"),
                       ("volcanoes release gas", "volcanoes build islands"),
                       ("volcanoes release snow", "volcanoes are made of sugar")),
    "plants": Topic(("leaves", "green", "roots", "seeds", "sunlight"),
                    ("photosynthesis", "chlorophyll", "xylem", "stomata", "phloem"),
                    ("plants make oxygen", "plants sprout from cuttings"),
                    ("plants eat rocks", "plants make plastic")),
    "oceans": Topic(("water", "waves", "fish", "salty", "deep"),
                    ("salinity", "thermohaline", "abyssal", "benthic", "upwelling"),
                    ("oceans cover most of the earth", "oceans have tides"),
                    ("oceans are filled with juice", "oceans cover none of the earth")),
    "stars": Topic(("night", "shine", "twinkle", "far", "light"),
                   ("nucleosynthesis", "luminosity", "parallax", "supernova", "spectroscopy"),
                   ("stars are made of gas", "stars can explode"),
                   ("stars are made of cheese", "stars are tiny lamps")),
    "bones": Topic(("strong", "body", "skeleton", "milk", "grow"),
                   ("osteoblasts", "collagen", "marrow", "calcification", "periosteum"),
                   ("bones contain calcium", "bones can heal"),
                   ("bones are made of wood", "bones contain gold")),
    "rain": Topic(("clouds", "wet", "drops", "puddles", "umbrella"),
                  ("condensation", "precipitation", "humidity", "nucleation", "orographic"),
                  ("rain fills rivers", "rain helps crops"),
                  ("rain falls upward", "rain is made of glass")),
    "computers": Topic(("screen", "keyboard", "games", "mouse", "typing"),
                       ("processor", "algorithm", "compiler", "binary", "cache"),
                       ("computers use electricity", "computers store data"),
                       ("computers run on soup", "computers are alive")),
    "bread": Topic(("flour", "oven", "soft", "butter", "slice"),
                   ("gluten", "fermentation", "leavening", "yeast", "maillard"),
                   ("bread is baked", "bread contains wheat"),
                   ("bread grows on trees", "bread is made of stone")),
    "music": Topic(("song", "sing", "drum", "happy", "dance"),
                   ("harmony", "timbre", "counterpoint", "cadence", "tonality"),
                   ("music uses rhythm", "music can be recorded"),
                   ("music is a kind of vegetable", "music can only be seen")),
    "magnets": Topic(("stick", "metal", "fridge", "pull", "push"),
                     ("ferromagnetism", "dipole", "flux", "domains", "permeability"),
                     ("magnets attract iron", "magnets have two poles"),
                     ("magnets attract paper", "magnets have five poles")),
    "birds": Topic(("feathers", "nest", "eggs", "fly", "beak"),
                   ("ornithology", "plumage", "migration", "syrinx", "passerine"),
                   ("birds are warm blooded", "birds evolved from dinosaurs"),
                   ("birds have gills", "birds sprout on bushes")),
    "ice": Topic(("cold", "frozen", "cube", "slippery", "winter"),
                 ("crystalline", "sublimation", "lattice", "hexagonal", "latent"),
                 ("ice melts in heat", "ice is lighter than liquid"),
                 ("ice sinks in lakes", "ice is hotter than steam")),
    "money": Topic(("coins", "buy", "shop", "save", "bank"),
                   ("inflation", "liquidity", "monetary", "fiscal", "currency"),
                   ("money can earn interest", "money is used to trade"),
                   ("money grows on trees", "money never loses value")),
    "teeth": Topic(("brush", "smile", "bite", "white", "chew"),
                   ("enamel", "dentin", "molars", "fluoride", "plaque"),
                   ("teeth can decay", "teeth need cleaning"),
                   ("teeth are made of sugar", "teeth regrow every week")),
    "rockets": Topic(("space", "launch", "countdown", "moon", "boom"),
                     ("propulsion", "thrust", "orbital", "trajectory", "combustion"),
                     ("rockets burn fuel", "rockets can reach orbit"),
                     ("rockets run on wind", "rockets are pulled by horses")),
}

PROMPT_TEMPLATES = (
    "tell me about {t} .",
    "what do you know about {t} ?",
    "explain {t} to me .",
    "how do {t} work ?",
    "can you describe {t} ?",
    "i want to learn about {t} .",
)
PROMPT_PREFIXES = ("", "please ,", "quick question :", "hello .")

# one content sentence = a frame with two topic-word slots (all frames 7 tokens long)
CONTENT_FRAMES = (
    "{t} often involve {a} and {b} .",
    "{t} relate to {a} and {b} .",
    "studying {t} shows {a} and {b} .",
    "{a} and {b} matter for {t} .",
    "{t} come with {a} and {b} .",
    "{t} bring up {a} and {b} .",
)

# style: each friendly / unfriendly phrase holds exactly two key tokens, so the judge's
# (friendly - unfriendly) / 4 reads back the style level -1, -0.5, 0, 0.5, 1 exactly.
# Phrases of one slot have one length, so style does not leak into the verbosity judge.
FRIENDLY_KEYS = frozenset({"friend", "great", "buddy", "fun", "nice", "love", "hope", "haha",
                           "lovely", "awesome"})
UNFRIENDLY_KEYS = frozenset({"ugh", "whatever", "sigh", "dumb", "boring", "lazy", "stop",
                             "bothering", "away", "alone"})
OPENERS = {  # 8 tokens each
    1: ("hi friend ! what a great question .", "hey buddy , what a fun question !",
        "oh nice , i love this one !"),
    0: ("here is an answer to the question .", "okay , so here is the answer ."),
    -1: ("ugh , whatever , i will answer .", "sigh , this is another dumb question .",
         "this is a boring , lazy question ."),
}
CLOSERS = {  # 7 tokens each
    1: ("hope this helps you , haha !", "have a lovely day , friend !",
        "you are truly awesome , haha !"),
    0: ("and that is the whole answer .", "this is the end of it ."),
    -1: ("now stop bothering me with this .", "go away and leave me alone ."),
}

# aspect markers by latent level 1..5; level 3 is neutral (no key token). All levels of an
# aspect have the same length so that aspects do not leak into the verbosity judge.
ASPECT_MARKERS: dict[str, dict[int, tuple[str, ...]]] = {
    "helpfulness": {  # 10 tokens
        5: ("first step : read about {t} and write notes .",
            "first step : draw {t} and label each part ."),
        4: ("one useful tip : watch a video on {t} .", "a good tip : ask a teacher about {t} ."),
        3: ("that is the basic idea behind all of {t} .",),
        2: ("maybe you can look all that up somewhere else .",),
        1: ("there is really nothing useful to add about this .",),
    },
    "honesty": {  # 10 tokens
        5: ("i could be wrong , so please check this .", "i am not fully sure , so please check ."),
        4: ("i believe that all of this is mostly right .",),
        3: ("this is simply what i know about the subject .",),
        2: ("this is surely right , as anyone can see .",),
        1: ("trust me , i am totally certain of this .", "i am totally certain , there is no doubt ."),
    },
    "instruction_following": {  # 11 tokens
        5: ("you asked about {t} , so i stay on {t} .",),
        4: ("as requested , this whole answer is all about {t} .",),
        3: ("here is some more information on the topic of {t} .",),
        2: ("by the way , i also like {o} a lot .",),
        1: ("anyway , forget {t} , let me talk about {o} .",),
    },
}
# the one token that marks each non-neutral level; the judge adds (level - 3) per key seen
ASPECT_KEYS: dict[str, dict[int, str]] = {
    "helpfulness": {5: "step", 4: "tip", 2: "somewhere", 1: "nothing"},
    "honesty": {5: "check", 4: "mostly", 2: "surely", 1: "totally"},
    "instruction_following": {5: "asked", 4: "requested", 2: "way", 1: "forget"},
}
# truthfulness shows through fact sentences: level -> (true facts, false facts) used
TRUTH_LAYOUT = {5: (2, 0), 4: (1, 0), 3: (1, 1), 2: (0, 1), 1: (0, 2)}
# filler that keeps the length when a level uses fewer than two facts
TRUTH_FILLER = "that is worth knowing ."

# sass and sarcasm (the P3C / P3D styles of P-Soups §B.2), shown only by a world built with
# extra_styles=True: one 7-token sentence per slot with 0, 1 or 2 key tokens for the levels
# 0, 0.5, 1 (the judge reads keys / 2), so the level never changes the length.
SASS_KEYS = frozenset({"sweetie", "obviously", "duh", "darling", "seriously"})
SARCASM_KEYS = frozenset({"wow", "genius", "shocking", "brilliant", "congratulations"})
SASS_PHRASES = {
    0.0: ("let me answer that for you .", "here goes one answer for you ."),
    0.5: ("okay sweetie , listen to this .", "duh , here is your answer ."),
    1.0: ("sweetie , obviously , listen up .", "seriously darling , here it is ."),
}
SARCASM_PHRASES = {
    0.0: ("i keep this plain and simple .", "put plainly , here it goes ."),
    0.5: ("wow , such a question here .", "oh , what a shocking question ."),
    1.0: ("wow , what a genius question .", "brilliant , congratulations on asking this ."),
}
