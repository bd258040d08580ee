"""Does the direction in DPA's system message move a model's preference for short answers at all?

    python scripts/dpa_direction_probe.py <policy folder or model name> [--base smollm2-135m-instruct] \
        [--config configs/soups-smollm2.yaml] [--directions 4]

For each test-split question of a judged candidate pool (the ``pool`` section of ``--config``):
its shortest and its longest answer. Under a system message s, delta(s) = log p(short | s) −
log p(long | s), summed over the response tokens. Printed per model (the base, then the policy):
delta under each sweep direction v from (1, 0) to (√2/2, −√2/2), written as DPA writes it
(``algos.dpa.direction_system_prompt``), and its shift from v = (1, 0) with a standard error over
questions; as a control, delta under P-Soups' worded "concise" and "informative" system texts
(P2A, P2B). A model that reads the direction's numbers shifts delta up as the verbosity weight
falls, as it does from "informative" to "concise"; generation needs no sampling noise to see it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.algos.dpa import direction_system_prompt, directions_between  # noqa: E402
from raypref.config import ConfigError, from_dict, load_yaml  # noqa: E402
from raypref.data.users import psoups_profile  # noqa: E402
from raypref.models.chat import encode_chat  # noqa: E402
from raypref.models.factory import load_pretrained  # noqa: E402
from raypref.recipes.pool import Pool, PoolConfig, load_pool  # noqa: E402

OBJECTIVES = ["helpfulness", "verbosity"]
WORDED = {"informative": "P2B", "concise": "P2A"}


def pool_from_config(path: str, pool_dir: str = "") -> Pool:
    """The judged pool a config file's ``pool`` section names (``pool_dir``: its parent folder, if
    not the section's); a missing section, an unknown key or a bad value exits naming the file."""
    try:
        loaded = load_yaml(path)
        if not isinstance(loaded.get("pool"), dict):
            raise ConfigError(f"{path}: no pool section (a config such as configs/soups-smollm2.yaml has one)")
        cfg = from_dict(PoolConfig, {**loaded["pool"], **({"dir": pool_dir} if pool_dir else {})}, f"{path}: pool.")
        cfg.validate()
    except (ConfigError, ValueError) as err:
        raise SystemExit(str(err) if str(path) in str(err) else f"{path}: {err}") from None
    return load_pool(cfg)


def short_long_pairs(pool: Pool) -> list[tuple[str, str, str]]:
    """(question, shortest answer, longest answer) for each test-split question of ``pool``."""
    words = np.asarray(pool.scores["verbosity"]) if "verbosity" in (pool.scores or {}) else None
    pairs = []
    for prompt, idx in pool.by_prompt("test").items():
        if len(idx) < 2:
            continue
        by_length = sorted(idx, key=lambda i: words[i] if words is not None else len(pool.candidates[i].text.split()))
        pairs.append((pool.prompts[prompt][0], pool.candidates[by_length[0]].text,
                      pool.candidates[by_length[-1]].text))
    if not pairs:
        raise ValueError(f"the pool in {pool.folder} has no test question with two answers")
    return pairs


@torch.no_grad()
def response_logprob(model, tokenizer, prompt: str, response: str, system: str | None) -> float:
    """log p(response | system, prompt), summed over the response's tokens (chat template)."""
    enc = encode_chat(tokenizer, prompt, response, system)
    ids = torch.tensor([enc.ids])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return float(logp.gather(1, ids[0, 1:, None])[enc.n_prompt - 1:].sum())


def deltas(model, tokenizer, pairs, system: str | None) -> np.ndarray:
    return np.array([response_logprob(model, tokenizer, q, short, system)
                     - response_logprob(model, tokenizer, q, long, system) for q, short, long in pairs])


def probe(model, tokenizer, pairs, n_directions: int = 4, system_text=None) -> dict:
    """delta per sweep direction and per worded system text, and each direction's shift from the
    first with its standard error over questions. ``system_text(v)``: the system message that asks
    for direction v (default DPA's, `algos.dpa.direction_system_prompt`)."""
    directions = directions_between((1.0, 0.0), (math.sqrt(0.5), -math.sqrt(0.5)), n_directions)
    system_text = system_text or (lambda v: direction_system_prompt(v, OBJECTIVES))
    rows = [deltas(model, tokenizer, pairs, system_text(v.tolist())) for v in directions]
    worded = {name: deltas(model, tokenizer, pairs, psoups_profile(p).prompt) for name, p in WORDED.items()}

    def shift(a, b):
        d = a - b
        return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")}

    return {"directions": [[round(float(x), 4) for x in v] for v in directions],
            "delta": [float(r.mean()) for r in rows],
            "shift": [shift(r, rows[0]) for r in rows],
            "worded_delta": {k: float(v.mean()) for k, v in worded.items()},
            "worded_shift": shift(worded["concise"], worded["informative"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="configs/soups-smollm2.yaml", help="a YAML file with a pool section")
    parser.add_argument("--pool_dir", default="", help="the pool's parent folder, if not the config's")
    parser.add_argument("--directions", type=int, default=4)
    args = parser.parse_args(argv)
    pairs = short_long_pairs(pool_from_config(args.config, args.pool_dir))
    print(f"[probe] {len(pairs)} test questions of the pool: shortest vs longest answer", flush=True)
    out = {}
    for label, path in (("base", args.base), ("policy", args.policy)):
        model, tokenizer = load_pretrained(path)
        out[label] = r = probe(model.eval(), tokenizer, pairs, args.directions)
        cells = "  ".join(f"v={tuple(v)}: {d:+.2f} (shift {s['mean']:+.2f} ± {s['se']:.2f})"
                          for v, d, s in zip(r["directions"], r["delta"], r["shift"]))
        w = r["worded_shift"]
        print(f"[probe] {label}: {cells}\n[probe] {label}: worded informative {r['worded_delta']['informative']:+.2f}, "
              f"concise {r['worded_delta']['concise']:+.2f} (shift {w['mean']:+.2f} ± {w['se']:.2f})", flush=True)
    return out


if __name__ == "__main__":
    main()
