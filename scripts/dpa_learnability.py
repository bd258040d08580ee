"""Can a policy learn direction-conditioned length from a fixed DPA dataset?

    # the simulated world: the dataset an RSF run held at a checkpoint
    python scripts/dpa_learnability.py <base model folder> <RSF checkpoint folder> \
        [--steps 150,400,800] [--prompts 48]
    # real text: the best answer per direction among a judged pool's answers (an ideal selection)
    python scripts/dpa_learnability.py smollm2-135m-instruct [<RSF checkpoint folder>] \
        --pool_config configs/soups-smollm2.yaml --steps 100,200,400,800 [--direction_words]

Fine-tunes the base (plain torch, one process, full model, SFT loss) on a fixed dataset of
(direction system message, question, answer) and reads the policy after each number of steps.
It separates "the data does not teach length control" from "this model cannot learn it":
`[rsf] iteration k kept data` in the RSF job's output shows the first, this the second.

World: the RSF checkpoint's kept responses; read by the mean generated length for the four
evaluation directions (1, 0) ... (√2/2, −√2/2) on held-out prompts.

Text (``--pool_config``, a YAML file with a ``pool`` section): unless the checkpoint argument names an RSF
run's dataset, each train question of the pool gets ``--directions_per_prompt`` directions drawn
as DPA draws them, each paired with the question's answer that maximizes v·r (helpfulness = the
quality judge, verbosity = words / ``--verbosity_words``; answers under the pool's quality floor
left out). That is the data a perfect rejection sampler would keep, so its length by direction
(printed first, on the test questions) is what a policy that learnt it would show. Read after each
number of steps by `dpa_direction_probe.probe` (does the direction move log p(short) − log p(long)?)
and, after the last, by a sampled sweep of the evaluation directions on the pool's test questions
(mean words, sampling sd, helpfulness), beside the base's. ``--out`` keeps every reading as JSON.
``--direction_words`` is the control: the same answers and steps, the direction asked for in words
(four bands, `worded_direction`), so a model that learns that but not the numbers cannot read them.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from raypref.algos.dpa import (DEFAULT_ANGLES, direction_system_prompt, directions_between,  # noqa: E402
                               sample_directions)
from raypref.algos.sft import sft_loss  # noqa: E402
from raypref.atomic import write_json  # noqa: E402
from raypref.models.factory import encode_example, extend_vocabulary, load_pretrained  # noqa: E402
from raypref.recipes.sft import collate  # noqa: E402
from raypref.train.runner import read_spec_state  # noqa: E402

WORLD_OBJECTIVES = ["overall_helpfulness", "verbosity"]
TEXT_OBJECTIVES = ["helpfulness", "verbosity"]


def eval_directions(n: int = 4) -> torch.Tensor:
    return directions_between((1.0, 0.0), (math.sqrt(0.5), -math.sqrt(0.5)), n)


def best_answers(pool, directions, split: str, verbosity_words: float) -> list[tuple[int, int, list[float]]]:
    """(question index, best answer's index, v) for each question of ``split`` and each v of
    ``directions`` (a list per question, or one list for all): the answer at or above the pool's
    quality floor that maximizes v·(helpfulness, verbosity) on `TextObjectives`' footing."""
    from raypref.rewards.text import on_footing

    if "quality" not in pool.scores or "verbosity" not in pool.scores:
        raise ValueError(f"pool {pool.folder}: needs quality and verbosity scores, has {sorted(pool.scores)} "
                         f"(judge it with jobs/pool.py)")
    units = on_footing({**pool.scores, "helpfulness": pool.scores["quality"]}, TEXT_OBJECTIVES, verbosity_words)
    rewards = np.stack([units[o] for o in TEXT_OBJECTIVES], axis=1)
    out = []
    for k, (question, idx) in enumerate(pool.by_prompt(split).items()):
        for v in (directions[k] if isinstance(directions, dict) else directions):
            v = [round(float(x), 4) for x in v]
            out.append((question, idx[int(np.argmax(rewards[idx] @ np.asarray(v)))], v))
    if not out:
        raise ValueError(f"pool {pool.folder}: no {split} question has an answer above the quality floor")
    return out


def worded_direction(direction) -> str:
    """A control for DPA's numbers: the direction's angle from (1, 0) in four bands of π/16, each
    asking in words for a shorter answer (the evaluation directions fall one in each band)."""
    angle = -math.atan2(float(direction[1]), float(direction[0]))
    band = min(len(LENGTH_WORDS) - 1, max(0, int(angle / (math.pi / 16))))
    return f"You are a helpful assistant. Keep your answer {LENGTH_WORDS[band]}."


LENGTH_WORDS = ("as full as the question deserves", "fairly short", "short", "as short as you can")


def oracle_examples(pool, per_prompt: int, verbosity_words: float, seed: int,
                    system_text=None) -> list[tuple[str, str, str]]:
    """(question, answer, direction system message) for every train question and ``per_prompt``
    directions drawn in DPA's angle range: `best_answers` as training examples. ``system_text(v)``:
    the system message for v (default DPA's numbers)."""
    system_text = system_text or (lambda v: direction_system_prompt(v, TEXT_OBJECTIVES))
    generator = torch.Generator().manual_seed(seed)
    questions = list(pool.by_prompt("train"))
    drawn = {k: sample_directions(per_prompt, 2, DEFAULT_ANGLES, generator=generator).tolist()
             for k in range(len(questions))}
    return [(pool.prompts[q][0], pool.candidates[i].text, system_text(v))
            for q, i, v in best_answers(pool, drawn, "train", verbosity_words)]


def ideal_lengths(pool, directions, verbosity_words: float) -> list[float]:
    """Mean words of `best_answers` on the test questions, per direction: the length by direction
    of a policy that learnt the ideal selection (the pool's answers, not its own)."""
    rows = best_answers(pool, [v.tolist() for v in directions], "test", verbosity_words)
    per = len(directions)
    return [round(float(np.mean([len(pool.candidates[i].text.split()) for _, i, _ in rows[d::per]])), 1)
            for d in range(per)]


def train_steps(model, tokenizer, optimizer, examples, steps: int, batch: int, max_length: int, rng,
                log_every: int = 25) -> float:
    """``steps`` SFT steps on batches drawn from ``examples`` ((prompt, response[, system]));
    returns the last step's loss."""
    model.train()
    start, loss = time.time(), float("nan")
    for step in range(steps):
        picks = rng.integers(len(examples), size=batch)
        # older world checkpoints hold (prompt, response), without a system message
        batch_ = collate([encode_example(tokenizer, examples[i][0], examples[i][1], max_length,
                                         system=examples[i][2] if len(examples[i]) > 2 else None)
                          for i in picks], tokenizer.pad_token_id)
        logits = model(input_ids=batch_["input_ids"], attention_mask=batch_["attention_mask"]).logits
        value = sft_loss(logits, batch_["input_ids"], batch_["response_mask"])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        loss = value.item()
        if (step + 1) % log_every == 0:
            print(f"[learnability]   {step + 1}/{steps} steps, loss {loss:.3f}, "
                  f"{(time.time() - start) / (step + 1):.1f} s a step", flush=True)
    model.eval()
    return loss


def world_run(args, steps: list[int]) -> list[tuple[int, list[float]]]:
    from raypref.data.world import World
    from raypref.experiments.rsf import direction_sweep
    from raypref.recipes.rsf import spelled_direction

    if not args.checkpoint:
        raise SystemExit("dpa_learnability: the world needs an RSF checkpoint folder (or give --pool_config)")
    examples = read_spec_state(args.checkpoint)["examples"]
    model, tokenizer = load_pretrained(args.base)
    # the same tokens the RSF job adds (a no-op for its own saved base)
    words = {w for v in ([1.0, -0.5], [0.25, 0.75]) for w in spelled_direction(v, WORLD_OBJECTIVES).split()}
    extend_vocabulary(model, tokenizer, sorted(words | set("0123456789")), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    world = World(seed=0)
    held_out = world.prompts(args.prompts, split="test")
    rng = np.random.default_rng(0)
    print(f"[learnability] {len(examples)} examples from {args.checkpoint}", flush=True)
    done, results = 0, []
    for target in steps:
        train_steps(model, tokenizer, optimizer, examples, target - done, args.batch, args.max_length, rng)
        done = target
        rows = direction_sweep(model, tokenizer, world, WORLD_OBJECTIVES, eval_directions(), held_out, 128,
                               seed=1, verbosity_by_length=True)
        lengths = [round(r["length"], 1) for r in rows]
        print(f"[learnability] step {done}: words by direction {lengths}", flush=True)
        results.append((done, lengths))
    return results


def _sweep(model, tokenizer, reward, directions, prompts, args, system_text) -> dict:
    from raypref.experiments.rsf import length_figures, text_direction_sweep

    rows = text_direction_sweep(model, tokenizer, reward, directions, prompts, args.max_new_tokens, seed=1,
                                samples=args.sweep_samples, system_text=system_text)
    return {"rows": [{k: r[k] for k in ("direction", "length", "length_sd", "helpfulness")} for r in rows],
            **length_figures(rows, "helpfulness")}


def _probe_line(step: int, r: dict) -> str:
    cells = "  ".join(f"{tuple(v)}: {s['mean']:+.2f} ± {s['se']:.2f}" for v, s in zip(r["directions"], r["shift"]))
    w = r["worded_shift"]
    return (f"[learnability] step {step}: probe shift from (1, 0) {cells} | worded concise − informative "
            f"{w['mean']:+.2f} ± {w['se']:.2f}")


def text_run(args, steps: list[int]) -> dict:
    from dpa_direction_probe import pool_from_config, probe, short_long_pairs

    from raypref.rewards.text import TextObjectives

    pool = pool_from_config(args.pool_config, args.pool_dir)
    directions = eval_directions()
    system_text = worded_direction if args.direction_words else None
    if args.checkpoint and args.direction_words:
        raise SystemExit("dpa_learnability: --direction_words rewrites the pool's selection, not an RSF dataset")
    if args.checkpoint:
        examples, source = read_spec_state(args.checkpoint)["examples"], f"the RSF dataset in {args.checkpoint}"
    else:
        examples = oracle_examples(pool, args.directions_per_prompt, args.verbosity_words, seed=0, system_text=system_text)
        source = (f"the best pool answer per direction, {args.directions_per_prompt} directions per train question"
                  + (", each direction in words (worded_direction)" if system_text else ""))
    out = {"source": source, "examples": len(examples), "directions": [v.tolist() for v in directions],
           "ideal_words": ideal_lengths(pool, directions, args.verbosity_words), "readings": []}
    print(f"[learnability] {len(examples)} examples: {source}\n[learnability] words of the best pool answer "
          f"by direction on the test questions (the ideal): {out['ideal_words']}", flush=True)
    pairs = short_long_pairs(pool)
    prompts = [pool.prompts[q][0] for q in pool.by_prompt("test")][:args.sweep_prompts]
    model, tokenizer = load_pretrained(args.base)
    reward = TextObjectives(TEXT_OBJECTIVES, args.verbosity_words, lm=(load_pretrained(args.base)[0].eval(), tokenizer))

    def save():
        if args.out:
            write_json(args.out, out, indent=1)

    out["base"] = {"probe": probe(model.eval(), tokenizer, pairs, system_text=system_text)}
    print(_probe_line(0, out["base"]["probe"]), flush=True)
    if args.sweep_samples:
        out["base"]["sweep"] = _sweep(model, tokenizer, reward, directions, prompts, args, system_text)
    save()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng, done = np.random.default_rng(0), 0
    for target in steps:
        loss = train_steps(model, tokenizer, optimizer, examples, target - done, args.batch, args.max_length, rng)
        done = target
        reading = {"step": done, "loss": loss, "probe": probe(model, tokenizer, pairs, system_text=system_text)}
        print(_probe_line(done, reading["probe"]), flush=True)
        if args.sweep_samples and target == steps[-1]:
            reading["sweep"] = _sweep(model, tokenizer, reward, directions, prompts, args, system_text)
        out["readings"].append(reading)
        save()
    for label, sweep in (("base", out["base"].get("sweep")), (f"step {done}", out["readings"][-1].get("sweep"))):
        if sweep:
            cells = ", ".join(f"{r['length']:.1f} ± {r['length_sd']:.1f} (helpfulness {r['helpfulness']:.3f})"
                              for r in sweep["rows"])
            print(f"[learnability] sweep, {label}: words by direction {cells}; monotone "
                  f"{sweep['length_monotone_decreasing']}, first − last {sweep['length_drop']:.1f} words = "
                  f"{sweep['length_drop_sds']:.1f} sd", flush=True)
    return out


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("checkpoint", nargs="?", default="", help="an RSF checkpoint folder: its dataset")
    parser.add_argument("--pool_config", default="", help="a YAML file with a pool section: the text path")
    parser.add_argument("--pool_dir", default="", help="the pool's parent folder, if not the config's")
    parser.add_argument("--steps", default="150,400,800", help="step counts at which to read the policy")
    parser.add_argument("--prompts", type=int, default=48, help="world: held-out prompts of the sweep")
    parser.add_argument("--lr", type=float, default=None,
                        help="default 5e-4 for the world's tiny model, 3e-5 for a pretrained LM (text)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (world), 4 (text)")
    parser.add_argument("--max_length", type=int, default=224)
    parser.add_argument("--directions_per_prompt", type=int, default=8, help="text: directions per train question")
    parser.add_argument("--verbosity_words", type=float, default=100.0, help="text: verbosity 1 at this many words")
    parser.add_argument("--sweep_prompts", type=int, default=40, help="text: test questions of the sweep")
    parser.add_argument("--sweep_samples", type=int, default=2, help="text: samples per question (0: no sweep)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--direction_words", action="store_true",
                        help="text: a control, each direction asked for in words (worded_direction), not numbers")
    parser.add_argument("--out", default="", help="text: write every reading to this JSON file")
    args = parser.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        raise SystemExit(f"--steps {args.steps!r}: give step counts as integers, e.g. 100,200,400") from None
    for name, value, ok in (("--steps", steps[0], steps[0] >= 1), ("--directions_per_prompt", args.directions_per_prompt,
                            args.directions_per_prompt >= 1), ("--sweep_prompts", args.sweep_prompts,
                            args.sweep_prompts >= 1), ("--sweep_samples", args.sweep_samples, args.sweep_samples >= 0)):
        if not ok:
            raise SystemExit(f"{name} {value}: must be >= {0 if name == '--sweep_samples' else 1}")
    text = bool(args.pool_config)
    args.lr = args.lr if args.lr is not None else (3e-5 if text else 5e-4)
    args.batch = args.batch if args.batch is not None else (4 if text else 8)
    torch.manual_seed(0)
    return text_run(args, steps) if text else world_run(args, steps)


if __name__ == "__main__":
    main(sys.argv[1:])
