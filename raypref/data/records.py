"""The one preference record type of raypref and its validation.

Every source (the simulated world, real-dataset loaders, shards on disk) produces
`PreferenceRecord`s; on disk and in Ray Data a record is a flat row (`to_row`) whose
score dicts are JSON text, so parquet and jsonl hold the same columns.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

UNKNOWN_USER = 0  # user id of an unknown / generic user (seed 004 §4.1)

ROW_COLUMNS = (
    "prompt", "chosen", "rejected", "user_id", "user_text",
    "chosen_scores", "rejected_scores", "source",
)


@dataclass
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    user_id: int = UNKNOWN_USER
    user_text: str | None = None
    # per-attribute scores of each response, e.g. {"helpfulness": 4.0, "verbosity": 0.7}
    chosen_scores: dict[str, float] = field(default_factory=dict)
    rejected_scores: dict[str, float] = field(default_factory=dict)
    source: str = ""

    def to_row(self) -> dict:
        """Flat row for parquet / jsonl / Ray Data (score dicts as JSON text)."""
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "user_id": int(self.user_id),
            "user_text": self.user_text or "",
            "chosen_scores": json.dumps(self.chosen_scores, sort_keys=True),
            "rejected_scores": json.dumps(self.rejected_scores, sort_keys=True),
            "source": self.source,
        }
