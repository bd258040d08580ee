"""DPO training throughput: the platform's Ray Train + DeepSpeed path vs trl's DPOTrainer.

Same model, pairs, batches, LoRA, lr schedule, beta, max_length and torch threads on both sides,
driven from one process, one side after the other:

* **platform**: ``DPOSpec`` (the DPO job's recipe: LoRA on a saved base, reference = the base
  with the adapter disabled) through ``raypref.train.runner.run``: one Ray Train worker,
  DeepSpeed ZeRO-``--zero-stage`` (the job's 0), ``cpus_per_worker = --threads``;
* **trl**: trl's ``DPOTrainer`` in this process (no Ray) with ``peft_config`` = the platform's own
  ``LoraConfig``: its reference is the base with the adapter disabled too (``precompute_ref_log_probs``
  stays False, so both sides run one reference forward per step). trl's own defaults of bf16
  autocast and gradient checkpointing are turned off to match the platform (fp32, no
  checkpointing); ``--trl-defaults`` leaves them on. Its optimizer stays the Trainer's default
  (``adamw_torch_fused``; the platform: DeepSpeed's torch AdamW).

The base is the DPO job's default shape (tiny 2 x 128 GPT-2 over the simulated world's word
vocabulary; ``--n-layer`` / ``--n-embd`` / ``--n-head`` to change it), built untrained: weights
do not change the cost of a step. ``--model smollm2-135m-instruct`` (or any model name or folder)
uses that pretrained model instead, with its chat template on both sides: the platform through
``models.chat``, trl from conversational rows (user prompt, assistant response), and LoRA on the
architecture's default targets (q/k/v/o_proj for Llama). The pairs are the world's P-Soups P1A pairs (user 1, the DPO
job's default). trl gets the platform's batch order (``train_sampling_strategy="sequential"`` on
the pairs listed in the order ``DPOSpec.batches`` draws them), so both sides train on the same
micro-batches step by step, pad to the same widths and start from the same LoRA initialisation.

The rate compared is the steady one: the wall time from the start of step ``--skip`` + 1 to the
start of step ``--skip`` + ``--measure`` + 1 (after the batch is fetched, before the forward: the
platform's ``spec.loss`` call, timestamped inside the worker; trl's ``on_step_begin``), i.e.
``--measure`` whole steps (forward policy + reference, loss, backward, clipping, AdamW, schedule,
the runner's / Trainer's bookkeeping and periodic metric reports). The default skip is one epoch
and the default measure whole epochs, so both windows hold the same pairs. The same window is
also measured in CPU time of the training process (the Ray worker / this process, all threads),
the figure to trust when other work shares the machine. Everything else (Ray
start, Ray Train launch, DeepSpeed setup, checkpoint, export, teardown; trl's construction and
tokenization) is printed apart, with an end-to-end rate for each side, and the platform's window
is split into plain steps and steps ending with the runner's metrics report (``ray.train.report``).

Also, in the same run: the loss of both on the same batch (the platform's first micro-batch,
through ``DPOSpec.loss`` and ``DPOTrainer.compute_loss``, with the same random non-zero
adapter), asserted equal to 1e-5; and the step-by-step training losses of the two timed runs.

Run: ``.venv/bin/python bench/dpo_throughput.py [--repeats 2 --threads 1 --batch 8 ...]``
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                      ("TOKENIZERS_PARALLELISM", "false"), ("RAY_USAGE_STATS_ENABLED", "0"),
                      ("TQDM_DISABLE", "1")):
    os.environ.setdefault(_name, _value)

import numpy as np
import torch

from raypref.recipes.dpo import DPOConfig, DPOSpec, epoch_chunks
from raypref.models.factory import LoraSettings
from raypref.train.spec import LoopSpec, StepContext

LOSS_TOL = 1e-5
PREFERENCE = "P1A"  # user 1: the DPO job's default user_ids=[1]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the platform, timestamped in the worker

@dataclass
class TimedSpec(LoopSpec):
    """Wraps a spec; inside the worker it records when the model is built, each ``loss`` call
    (one per step: grad_accum = 1) and the end of the export, into ``stamp_file``."""

    inner: LoopSpec
    stamp_file: str
    stamps: dict = field(default_factory=dict)

    def roles(self):
        return self.inner.roles()

    def build_model(self, role="policy"):
        self.stamps = {"build": time.time(), "torch_threads": torch.get_num_threads(), "loss_at": [],
                       "cpu_at": []}
        return self.inner.build_model(role)

    def param_groups(self, role, model):
        return self.inner.param_groups(role, model)

    def fingerprint(self):
        return self.inner.fingerprint()

    def batches(self, ctx):
        return self.inner.batches(ctx)

    def loss(self, batch, ctx):
        if not self.stamps["loss_at"]:  # the worker's threading as training starts
            self.stamps["threads_at_first_loss"] = torch.get_num_threads()
            self.stamps["affinity"] = sorted(os.sched_getaffinity(0))
            self.stamps["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                 "OMP_PROC_BIND", "KMP_AFFINITY")}
        self.stamps["loss_at"].append(time.time())
        self.stamps["cpu_at"].append(time.process_time())  # this worker process, all its threads
        return self.inner.loss(batch, ctx)

    def evaluate(self, ctx):
        return self.inner.evaluate(ctx)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def export(self, models, out_dir):
        self.inner.export(models, out_dir)
        self.stamps["exported"] = time.time()
        self.stamps["peak_rss_mib"] = peak_rss_mib()
        Path(self.stamp_file).write_text(json.dumps(self.stamps))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ship_this_module_by_value() -> None:
    """Ray workers cannot import bench/ (no package): pickle TimedSpec by value even when this
    file is imported rather than run (as __main__ it already is)."""
    if __name__ != "__main__":
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- shared setup

def build_base(args, out: Path) -> str:
    """The DPO job's base shape (untrained), saved as SFT saves it; cached by shape under --out."""
    from raypref.data.world import World
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer, resolve_model, \
        save_pretrained_safetensors

    if args.model != "tiny":
        return resolve_model(args.model)  # a named model is converted once into its cache
    target = out / f"base-L{args.n_layer}-E{args.n_embd}-H{args.n_head}"
    if (target / "config.json").exists():
        return str(target)
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      n_positions=max(256, args.max_length))
    tokenizer = build_tokenizer(cfg, World(seed=0).vocabulary())
    torch.manual_seed(0)
    return str(save_pretrained_safetensors(build_policy(cfg, tokenizer), tokenizer, target))


def training_config(args) -> DPOConfig:
    cfg = DPOConfig(steps=args.steps, micro_batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                    beta=args.beta, max_length=args.max_length,
                    lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha))
    cfg.validate()
    return cfg


def batch_order(n_pairs: int, batch: int, steps: int, seed: int) -> list[int]:
    """Pair indices in the order the platform's single worker trains on them (DPOSpec.batches)."""
    chunks = epoch_chunks(n_pairs, batch, 0, seed)
    return [i for _ in range(steps) for i in next(chunks)]


def trl_trainer(base_dir: str, pairs, order: list[int], cfg: DPOConfig, args, peft_config, out_dir: Path,
                callbacks=()):
    """trl's DPOTrainer on the same base, pairs (in the platform's order), LoRA and settings."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig as TrlDPOConfig, DPOTrainer

    from raypref.models.chat import has_chat_template
    from raypref.models.factory import format_prompt, load_pretrained

    class RecordingDPOTrainer(DPOTrainer):
        """Keeps each step's training loss (trl logs only averages)."""

        step_losses: list

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            self.step_losses.append(float(loss))
            return loss

    base, tokenizer = load_pretrained(base_dir)
    if has_chat_template(tokenizer):  # conversational rows: trl applies the chat template itself
        rows = [{"prompt": [{"role": "user", "content": pairs[i].prompt}],
                 "chosen": [{"role": "assistant", "content": pairs[i].chosen}],
                 "rejected": [{"role": "assistant", "content": pairs[i].rejected}]} for i in order]
    else:  # the platform's text format (format_prompt, then " " + response); trl appends the eos itself
        rows = [{"prompt": format_prompt(pairs[i].prompt), "chosen": " " + pairs[i].chosen,
                 "rejected": " " + pairs[i].rejected} for i in order]
    targs = TrlDPOConfig(
        output_dir=str(out_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
        beta=cfg.beta, loss_type=[cfg.loss_type], max_length=cfg.max_length,
        train_sampling_strategy="sequential", logging_steps=log_every(cfg.steps), save_strategy="no",
        report_to=[], use_cpu=True, seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        # trl's own defaults are bf16 autocast and gradient checkpointing; the platform trains in
        # fp32 without checkpointing (the DPO job's Resources.bf16 = False)
        **({} if args.trl_defaults else {"bf16": False, "gradient_checkpointing": False}))
    trainer = RecordingDPOTrainer(model=base, args=targs, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=list(callbacks))
    trainer.step_losses = []
    trainer.remove_callback(PrinterCallback)  # no log dicts on stdout (the platform's stay in its worker)
    return trainer


def log_every(steps: int) -> int:
    return max(1, steps // 10)  # runner_config's default, used by the platform's run


# ---------------------------------------------------------------- loss on the same batch

def loss_check(base_dir: str, pairs, cfg: DPOConfig, args, out: Path) -> dict:
    """The platform's DPOSpec.loss and trl's compute_loss on the platform's first micro-batch,
    with the same random non-zero adapter on both (a fresh LoRA gives log 2 on both sides)."""
    spec = DPOSpec.from_config(cfg, base_dir, pairs, name=PREFERENCE, seed=args.seed)
    torch.manual_seed(args.seed)
    ours = spec.build_model()
    ctx = StepContext(step=1, max_steps=1, rank=0, world_size=1, micro_batch_size=cfg.micro_batch_size,
                      grad_accum=1, seed=args.seed, models={"policy": ours})
    batch = next(spec.batches(ctx))
    order = batch_order(len(pairs), cfg.micro_batch_size, 1, args.seed)
    trainer = trl_trainer(base_dir, pairs, order, cfg, args, copy.deepcopy(ours.peft_config["default"]),
                          out / "trl-loss-check")
    theirs = dict(trainer.model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * args.adapter_scale)
            theirs[name].copy_(p)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(cfg.micro_batch_size)])
    same_tokens = all(torch.equal(trl_batch[a], batch[b]) for a, b in
                      (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                       ("completion_mask", "labels_mask")))
    ours.train()
    trainer.model.train()
    with torch.no_grad():
        platform = spec.loss(batch, ctx)[0].item()
        trl = trainer.compute_loss(trainer.model, trl_batch).item()
    return {"platform": platform, "trl": trl, "abs_diff": abs(platform - trl), "same_tokens": same_tokens,
            "tokens": int(batch["attention_mask"].sum()), "shape": list(batch["input_ids"].shape)}


# ---------------------------------------------------------------- timed runs

def window(times: list[float], skip: int, measure: int) -> float:
    """Seconds from the start of step skip + 1 to the start of step skip + measure + 1."""
    return times[skip + measure] - times[skip]


def time_platform(base_dir: str, pairs, cfg: DPOConfig, args, storage: Path) -> dict:
    from raypref.train.runner import Resources, run, runner_config

    _ship_this_module_by_value()
    storage.mkdir(parents=True, exist_ok=True)
    stamp_file = storage / "stamps.json"
    spec = TimedSpec(DPOSpec.from_config(cfg, base_dir, pairs, name=PREFERENCE, seed=args.seed),
                     str(stamp_file))
    resources = Resources(num_workers=1, cpus_per_worker=float(args.threads), zero_stage=args.zero_stage,
                          checkpoint_every=args.checkpoint_every or cfg.steps, max_failures=0)
    rcfg = runner_config(cfg, resources, name="dpo", storage_path=str(storage), seed=args.seed)
    start = time.time()
    result = run(spec, rcfg)
    end = time.time()
    s = json.loads(stamp_file.read_text())
    t = s["loss_at"]
    if len(t) != cfg.steps:
        raise RuntimeError(f"platform run: {len(t)} loss calls for {cfg.steps} steps")
    w, cpu = window(t, args.skip, args.measure), window(s["cpu_at"], args.skip, args.measure)
    return {
        "window_s": w, "pairs_per_s": args.measure * cfg.micro_batch_size / w, "ms_per_step": 1000 * w / args.measure,
        "window_cpu_s": cpu, "cpu_pairs_per_s": args.measure * cfg.micro_batch_size / cpu,
        "end_to_end_s": end - start, "torch_threads": s["torch_threads"], "peak_rss_mib": s["peak_rss_mib"],
        "worker": {k: s.get(k) for k in ("threads_at_first_loss", "affinity", "env")},
        "step_wall_s": [b - a for a, b in zip(t, t[1:])], "step_cpu_s": [b - a for a, b in zip(s["cpu_at"], s["cpu_at"][1:])],
        "parts": {"launch (Ray Train controller + worker, import)": s["build"] - start,
                  "setup (base + LoRA + deepspeed.initialize + tokenize)": t[0] - s["build"],
                  f"steps 1-{args.skip} (warm-up, excluded)": t[args.skip] - t[0],
                  f"window: {args.measure} steps": w,
                  "steps after the window but the last": t[-1] - t[args.skip + args.measure],
                  "last step + checkpoint + export": s["exported"] - t[-1],
                  "teardown (until run() returns)": end - s["exported"]},
        "losses": [row["loss"] for row in result.metrics], "lrs": [row["lr"] for row in result.metrics],
    }


def time_trl(base_dir: str, pairs, cfg: DPOConfig, args, out_dir: Path, peft_config) -> dict:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.cpu, self.lrs = [], [], []

        def on_step_begin(self, targs, state, control, **kw):
            self.begin.append(time.time())
            self.cpu.append(time.process_time())  # this process, all its threads
            self.lrs.append(kw["lr_scheduler"].get_last_lr()[0])

    timer = StepTimer()
    start = time.time()
    order = batch_order(len(pairs), cfg.micro_batch_size, cfg.steps, args.seed)
    trainer = trl_trainer(base_dir, pairs, order, cfg, args, copy.deepcopy(peft_config), out_dir, [timer])
    built = time.time()
    trainer.train()
    end = time.time()
    t = timer.begin
    if len(t) != cfg.steps:
        raise RuntimeError(f"trl run: {len(t)} steps begun for {cfg.steps}")
    w, cpu = window(t, args.skip, args.measure), window(timer.cpu, args.skip, args.measure)
    return {
        "window_s": w, "pairs_per_s": args.measure * cfg.micro_batch_size / w, "ms_per_step": 1000 * w / args.measure,
        "window_cpu_s": cpu, "cpu_pairs_per_s": args.measure * cfg.micro_batch_size / cpu,
        "step_wall_s": [b - a for a, b in zip(t, t[1:])], "step_cpu_s": [b - a for a, b in zip(timer.cpu, timer.cpu[1:])],
        "end_to_end_s": end - start, "torch_threads": torch.get_num_threads(), "optim": trainer.args.optim.value,
        "peak_rss_mib": peak_rss_mib(),
        "bf16": trainer.args.bf16, "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "parts": {"DPOTrainer() (load base, LoRA, tokenize, accelerate)": built - start,
                  "train() until step 1 begins (dataloader, optimizer)": t[0] - built,
                  f"steps 1-{args.skip} (warm-up, excluded)": t[args.skip] - t[0],
                  f"window: {args.measure} steps": w,
                  "steps after the window but the last": t[-1] - t[args.skip + args.measure],
                  "last step + train() end": end - t[-1]},
        "losses": trainer.step_losses, "lrs": timer.lrs,
    }


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    defaults = DPOConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=64, help="training pairs (P-Soups P1A of the simulated world)")
    p.add_argument("--batch", type=int, default=defaults.micro_batch_size, help="pairs per step")
    p.add_argument("--skip", type=int, default=0, help="warm-up steps left out of the rate (default: one epoch)")
    p.add_argument("--measure", type=int, default=0,
                   help="steps in the timed window (default: 8 epochs; a whole number of epochs keeps "
                        "the same pairs in both windows)")
    p.add_argument("--repeats", type=int, default=2, help="platform + trl measurements, alternating")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each side (platform: cpus_per_worker; the DPO job uses 1)")
    p.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage (the DPO job's: 0)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="platform checkpoint interval (default 0: only the final one, after the window; "
                        "the DPO job's is 50)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup_steps, help="lr warm-up steps")
    p.add_argument("--beta", type=float, default=defaults.beta)
    p.add_argument("--max-length", type=int, default=defaults.max_length)
    p.add_argument("--lora-r", type=int, default=defaults.lora.r)
    p.add_argument("--lora-alpha", type=int, default=defaults.lora.alpha)
    p.add_argument("--adapter-scale", type=float, default=0.1,
                   help="std of the random adapter of the same-batch loss check; at 0.1 a 30-layer pretrained "
                        "model is pushed far from its reference (loss ~7, float32 rounding ~1e-5 relative), "
                        "0.02 keeps the loss in DPO's usual range")
    p.add_argument("--model", default="tiny",
                   help="tiny (an untrained GPT-2 of --n-layer/--n-embd/--n-head), a named model such as "
                        "smollm2-135m-instruct, or a model folder")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--trl-defaults", action="store_true",
                   help="leave trl's bf16 autocast and gradient checkpointing on (its defaults; not the "
                        "platform's settings)")
    p.add_argument("--out", default="outputs/bench/dpo_throughput")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = p.parse_args(argv)
    per_epoch = args.pairs // args.batch
    if args.batch < 1 or per_epoch < 1:
        p.error("need --batch >= 1 and --pairs >= --batch")
    args.skip = args.skip or per_epoch
    args.measure = args.measure or 8 * per_epoch
    args.steps = args.skip + args.measure + 1  # +1: the window ends where the step after it begins
    if args.threads < 1 or args.repeats < 1:
        p.error("need --threads >= 1 and --repeats >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = out / f"runs-{stamp}"
    torch.set_num_threads(args.threads)  # trl's side runs in this process
    load_before = os.getloadavg()
    log(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
        f"({os.cpu_count()} CPUs; other work on the machine skews timings)")

    from raypref.data.world import World

    base_dir = build_base(args, out)
    pairs = World(seed=0).pairs_for_preference(PREFERENCE, args.pairs, np.random.default_rng(args.seed))
    cfg = training_config(args)
    log(f"base {base_dir}; {len(pairs)} {PREFERENCE} pairs; {cfg.steps} steps x {cfg.micro_batch_size} pairs "
        f"(window: steps {args.skip + 1}-{args.skip + args.measure}); {args.threads} torch thread(s) a side")

    check = loss_check(base_dir, pairs, cfg, args, runs)
    log(f"same batch ({check['shape'][0] // 2} pairs, {check['tokens']} tokens), same random adapter: "
        f"platform loss {check['platform']:.7f}, trl loss {check['trl']:.7f}, |diff| {check['abs_diff']:.2e}")
    assert check["same_tokens"], "the platform's and trl's collated batches differ"
    assert check["abs_diff"] < LOSS_TOL, f"losses differ by {check['abs_diff']:.2e} (> {LOSS_TOL})"

    import ray

    t0 = time.time()
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=args.verbose,
             configure_logging=False)
    ray_start = time.time() - t0
    log(f"ray.init: {ray_start:.1f} s (once, not in either figure)")
    # trl gets the platform's own LoraConfig, as add_lora builds it
    peft_config = DPOSpec.from_config(cfg, base_dir, pairs).build_model().peft_config["default"]
    args.lora_targets = sorted(peft_config.target_modules)
    reps = []
    try:
        for r in range(args.repeats):
            log(f"repeat {r + 1}/{args.repeats}: platform (Ray Train + DeepSpeed, 1 worker)")
            plat = time_platform(base_dir, pairs, cfg, args, runs / f"platform-{r}")
            log(f"  {plat['pairs_per_s']:.1f} pairs/s in the window ({plat['cpu_pairs_per_s']:.1f} per CPU s), "
                f"{plat['end_to_end_s']:.1f} s end to end, load {os.getloadavg()[0]:.2f}")
            log(f"repeat {r + 1}/{args.repeats}: trl DPOTrainer (in process)")
            trl = time_trl(base_dir, pairs, cfg, args, runs / f"trl-{r}", peft_config)
            log(f"  {trl['pairs_per_s']:.1f} pairs/s in the window ({trl['cpu_pairs_per_s']:.1f} per CPU s), "
                f"{trl['end_to_end_s']:.1f} s end to end, load {os.getloadavg()[0]:.2f}")
            reps.append({"platform": plat, "trl": trl})
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    log(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    results = report(args, cfg, check, ray_start, reps)
    results.update(load_before=load_before, load_after=load_after, base_dir=base_dir)
    path = out / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    log(f"figures: {path}")
    if not args.keep:
        shutil.rmtree(runs, ignore_errors=True)
    return results


# ---------------------------------------------------------------- report

def report(args, cfg: DPOConfig, check: dict, ray_start: float, reps: list[dict]) -> dict:
    side = ("platform", "trl")
    model = f"GPT-2 {args.n_layer} x {args.n_embd}" if args.model == "tiny" else args.model
    print(f"\nDPO, LoRA r{cfg.lora.r}/alpha {cfg.lora.alpha} on {'/'.join(sorted(args.lora_targets))}, {model}, beta {cfg.beta}, lr {cfg.lr} (warm-up {cfg.warmup_steps}, linear decay), clip "
          f"{cfg.grad_clip}, {cfg.micro_batch_size} pairs/step, {cfg.steps} steps on {args.pairs} pairs, "
          f"max_length {cfg.max_length}")
    print(f"platform: DPOSpec -> runner.run, 1 Ray Train worker, DeepSpeed ZeRO-{args.zero_stage}, "
          f"cpus_per_worker {args.threads} (torch threads {reps[0]['platform']['torch_threads']}), checkpoint "
          f"{'every ' + str(args.checkpoint_every) if args.checkpoint_every else 'only at the end'}")
    print(f"trl:      DPOTrainer(peft_config=the platform's LoraConfig), in process, no Ray, torch threads "
          f"{reps[0]['trl']['torch_threads']}, optim {reps[0]['trl']['optim']} (Trainer default), bf16 "
          f"{reps[0]['trl']['bf16']}, gradient checkpointing {reps[0]['trl']['gradient_checkpointing']}"
          f"{' (trl defaults, NOT the platform settings)' if args.trl_defaults else ''}, no checkpoints")
    print("both:     reference = base with the adapter disabled, one reference forward per step "
          "(no precomputed reference log-probs), same micro-batches in the same order")

    head = f"{'':<34}{'platform':>12}{'trl':>12}{'platform/trl':>14}"
    print(f"\nSteady rate: steps {args.skip + 1}-{args.skip + args.measure} ({args.measure} steps = "
          f"{args.measure * cfg.micro_batch_size // args.pairs} epochs), start of step to start of step")
    print(head)
    print("-" * len(head))
    rates = {s: [r[s]["pairs_per_s"] for r in reps] for s in side}
    for i, r in enumerate(reps):
        print(f"{'repeat ' + str(i + 1) + ' pairs/s':<34}{r['platform']['pairs_per_s']:>12.1f}"
              f"{r['trl']['pairs_per_s']:>12.1f}{r['platform']['pairs_per_s'] / r['trl']['pairs_per_s']:>14.2f}")
        print(f"{'         ms/step':<34}{r['platform']['ms_per_step']:>12.1f}{r['trl']['ms_per_step']:>12.1f}")
    med = {s: statistics.median(rates[s]) for s in side}
    ratio = med["platform"] / med["trl"]
    print(f"{'median pairs/s':<34}{med['platform']:>12.1f}{med['trl']:>12.1f}{ratio:>14.2f}")
    cpu_rates = {s: [r[s]["cpu_pairs_per_s"] for r in reps] for s in side}
    cpu_med = {s: statistics.median(cpu_rates[s]) for s in side}
    print(f"{'CPU-time pairs/s (median)':<34}{cpu_med['platform']:>12.1f}{cpu_med['trl']:>12.1f}"
          f"{cpu_med['platform'] / cpu_med['trl']:>14.2f}   per repeat: "
          + ", ".join(f"{r['platform']['cpu_pairs_per_s'] / r['trl']['cpu_pairs_per_s']:.2f}" for r in reps))
    print("  (CPU time of the training process over the same window, all its threads: the Ray worker / this "
          "process; the figure to trust on a shared machine)")
    e2e = {s: statistics.median([cfg.steps * cfg.micro_batch_size / r[s]["end_to_end_s"] for r in reps])
           for s in side}
    print(f"{'end to end pairs/s (median)':<34}{e2e['platform']:>12.1f}{e2e['trl']:>12.1f}"
          f"{e2e['platform'] / e2e['trl']:>14.2f}")
    print(f"  (end to end: {cfg.steps} steps / the whole run: platform runner.run() call to return, without "
          f"ray.init ({ray_start:.1f} s); trl DPOTrainer() + train())")
    spread = {s: (max(rates[s]) - min(rates[s])) / min(rates[s]) for s in side}
    if len(reps) > 1:
        print(f"  noise: repeats differ by {100 * spread['platform']:.0f} % (platform), "
              f"{100 * spread['trl']:.0f} % (trl)"
              + ("  <- the machine was busy, read the ratio with care" if max(spread.values()) > 0.15 else ""))

    print(f"{'peak resident memory, MiB':<34}{reps[0]['platform']['peak_rss_mib']:>12.0f}"
          f"{reps[0]['trl']['peak_rss_mib']:>12.0f}")
    print("  (platform: its Ray worker process; trl: this process, which also ran the same-batch loss "
          "check and holds the pairs, so an upper bound)")

    print_report_waits(args, cfg, reps)

    print("\nWhere the time goes (s, repeat 1):")
    for s in side:
        for part, secs in reps[0][s]["parts"].items():
            print(f"  {s:<9}{part:<58}{secs:>8.2f}")
        print(f"  {s:<9}{'total':<58}{reps[0][s]['end_to_end_s']:>8.2f}")

    print(f"\nLoss on the same batch ({check['shape'][0] // 2} pairs, same tokens: {check['same_tokens']}, same "
          f"random adapter): platform {check['platform']:.7f}  trl {check['trl']:.7f}  |diff| "
          f"{check['abs_diff']:.2e}  (asserted < {LOSS_TOL:g})")
    lp, lt = reps[0]["platform"]["losses"], reps[0]["trl"]["losses"]
    dl = [abs(a - b) for a, b in zip(lp, lt)]
    dlr = [abs(a - b) for a, b in zip(reps[0]["platform"]["lrs"], reps[0]["trl"]["lrs"])]
    print(f"Training losses of the two timed runs (repeat 1, same batches and init): step 1 {lp[0]:.6f} / "
          f"{lt[0]:.6f}; last {lp[-1]:.6f} / {lt[-1]:.6f}; max |diff| over {len(dl)} steps {max(dl):.2e} "
          f"(steps 1-10: {max(dl[:10]):.2e}); max |lr diff| {max(dlr):.2e} (informational: not asserted)")
    lp_lr, lt_lr = reps[0]["platform"]["lrs"], reps[0]["trl"]["lrs"]
    behind = all(abs(a - b) < 1e-12 for a, b in zip(lp_lr[1:], lt_lr[:-1]))
    if behind:
        print("  (the platform's lr schedule runs one step behind trl's: DeepSpeed's WarmupLR gives steps 1 AND 2 "
              "lr 0, the Trainer's linear warm-up only step 1; same cost per step)")
    return {"args": vars(args), "loss_check": check, "ray_init_s": ray_start, "repeats": reps,
            "median_pairs_per_s": med, "ratio": ratio, "median_cpu_pairs_per_s": cpu_med,
            "cpu_ratio": cpu_med["platform"] / cpu_med["trl"], "end_to_end_pairs_per_s": e2e}


def print_report_waits(args, cfg: DPOConfig, reps: list[dict]) -> None:
    """Split the platform's window into training steps and the steps that end with the runner's
    metrics report (``ray.train.report`` every ``log_every`` steps; checkpoints happen after
    the window): Ray Train keeps one report per worker and its controller takes it every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so a report made sooner waits, idle."""
    every = log_every(cfg.steps)
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2 (default)")
    print(f"\nPlatform steps in the window that end with a metrics report (every {every} steps; "
          f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={interval}) vs the others, ms (median over repeats):")
    if every == 1:  # a short run (< 20 steps) reports at every step: nothing to split
        print("  every step ends with a report (a run of fewer than 20 steps): no split")
        return
    rows = {"plain": [], "report": [], "wait": [], "n": [], "trl": []}
    for r in reps:
        walls = r["platform"]["step_wall_s"]
        steps = range(args.skip, args.skip + args.measure)  # index i = step i + 1
        plain = [walls[i] for i in steps if (i + 1) % every]
        report = [walls[i] for i in steps if (i + 1) % every == 0]
        base = statistics.median(plain)
        rows["plain"].append(base)
        rows["report"].append(statistics.median(report) if report else float("nan"))
        rows["wait"].append(sum(w - base for w in report))
        rows["n"].append(len(report))
        rows["trl"].append(statistics.median(r["trl"]["step_wall_s"][args.skip:args.skip + args.measure]))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"  platform step without a report {1000 * med['plain']:.0f}, with one {1000 * med['report']:.0f}; "
          f"trl step {1000 * med['trl']:.0f} (platform/trl by steps without a report: "
          f"{med['trl'] / med['plain']:.2f}x)")
    window = statistics.median([r["platform"]["window_s"] for r in reps])
    print(f"  {med['n']:.0f} reports in the window cost {med['wait']:.1f} s of its {window:.1f} s "
          f"({100 * med['wait'] / window:.0f} %) beyond a plain step")


if __name__ == "__main__":
    main()
