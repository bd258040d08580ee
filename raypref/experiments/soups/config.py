"""The Personalized Soups job config: every default runs on one CPU machine in minutes."""
from __future__ import annotations

from dataclasses import dataclass, field

from raypref.data.users import psoups_combinations, psoups_profiles
from raypref.experiments.soups.evaluate import EvalConfig
from raypref.models.merge import METHODS as MERGE_METHODS
from raypref.recipes import pair_methods, per_preference_methods, recipe
from raypref.recipes.dpo import DPOConfig
from raypref.recipes.pool import PoolConfig
from raypref.recipes.ppo import PPOConfig
from raypref.recipes.sft import SFTConfig
from raypref.train.runner import Resources

BASELINES = ("sft", "prompting", "pmorl")
PAIRS_SOURCES = ("world", "pool")


def _soups_training() -> DPOConfig:
    # sft_weight: without the NLL term on the chosen responses every DPO arm lost general
    # quality (P-Soups 0.239, P-MORL 0.154 vs SFT 0.298, seed 0) and no weight sweep held it;
    # with 1.0, P-Soups 0.270 and all three sweeps rise with quality held (same run otherwise)
    return DPOConfig(steps=200, micro_batch_size=8, lr=5e-4, beta=0.5, warmup_steps=10, sft_weight=1.0)


def _soups_resources() -> Resources:
    # of *each* per-preference run. A whole CPU each: on 2 cores, 7 runs of 60 steps took 250 s
    # two at a time against 346 s all at once at 0.25 CPU (same background load); the runs'
    # controllers, helper actors and workers then compete for the cores they all wait on
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=25)


@dataclass
class SoupsConfig:
    """Personalized Soups: per-preference policies, trained concurrently, merged post hoc."""

    output_dir: str = "outputs/soups"
    # where the training runs' checkpoints live: "" = <output_dir>/runs; a shared filesystem
    # path or a URI (s3://bucket/prefix, gs://...) on a cluster, reachable from every node
    storage_path: str = ""
    seed: int = 0
    # training seeds: seed s (0..seeds-1) uses seed + s for its pairs, LoRA init and sampling;
    # its runs are named <preference>-s<s>; win rates carry bootstrap intervals over seeds
    seeds: int = 1
    algo: str = "dpo"  # the per-preference method, by registry name (raypref.recipes): dpo, ipo, ppo, ...
    preferences: list[str] = field(default_factory=lambda: [p.name for p in psoups_profiles()])
    # soups to build and compare; default: the 8 combinations of P-Soups Table 4 (uniform weights)
    combinations: list[list[str]] = field(default_factory=psoups_combinations)
    # an extra user's soup, e.g. {"P1A": 0.5, "P2B": 0.3, "P3A": 0.2}
    user_weights: dict[str, float] = field(default_factory=dict)
    # how that user weighs its preferences, e.g. {"P1A": 0.6, "P2A": 0.3, "P3B": 0.1}: its soup is
    # then judged on the held-out prompts and scored as the weighted mean of the preferences'
    # 0..1 rewards (user_score; the merge-weight sweep maximizes it over user_weights)
    user_target: dict[str, float] = field(default_factory=dict)
    merge_method: str = "exact_lora"    # see raypref.models.merge.METHODS
    merge_density: float = 0.5          # ties / dare only
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # where the pairs come from: "world" (the simulated world's text and latent scores) or "pool"
    # (real text: the shared candidate pool sampled from the base, `pool`, generated on first use
    # and cached; labelled by the text judges); psoups_files, when given, replace either
    pairs_source: str = "world"
    pool: PoolConfig = field(default_factory=PoolConfig)
    label_noise: float = 0.1  # pool pairs: each label flips with this probability (every arm alike)
    # real data: {preference: P-Soups preference file or hub dataset}; empty = simulated world
    psoups_files: dict[str, str] = field(default_factory=dict)
    # how those files read: psoups (P-Soups' user_input / completion_a / completion_b) or trl
    # (your own prompt / chosen / rejected rows, text or messages: one file per preference)
    psoups_format: str = "psoups"
    psoups_split: str = ""  # split of a hub dataset or saved DatasetDict among psoups_files ("" = its only one)
    max_quarantine_fraction: float = 0.05  # of a preference file's rows; more bad rows stop the job
    # the shared base of every policy: "" = warm-start the tiny model on the world (`sft`),
    # else a Hugging Face id or local folder used as is (e.g. an instruction-tuned 7B)
    base_policy: str = ""
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs_per_preference: int = 1600  # simulated pairs per policy; 10% more are drawn as held-out
    # how each per-preference policy (and P-MORL) is trained by a preference-pair method (dpo, ipo, ...)
    training: DPOConfig = field(default_factory=_soups_training)
    # how each per-preference policy is trained by ppo (its reward: the preference's judge)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    resources: Resources = field(default_factory=_soups_resources)
    # training runs at once; 0 = as many as the cluster's CPUs / GPUs hold (2 of the default's
    # 1-CPU runs on 2 cores). Each run brings its own Ray Train controller and helper actors:
    # 21 at once (3 seeds) filled 19 of this machine's 23 GiB and none had started after 4 min
    max_concurrent_runs: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    register_models: bool = True        # merged soups into the MLflow model registry
    # testing the failure path: these runs crash ("once": first attempt only, "always")
    inject_failures: dict[str, str] = field(default_factory=dict)
    restart: bool = False  # retrain every policy even if runs of this training config exist

    @property
    def policy_training(self):
        """The chosen method's config section (the field its registry entry names)."""
        return getattr(self, recipe(self.algo).section)

    def validate(self) -> None:
        known = {p.name for p in psoups_profiles(extended=True)}
        if self.algo not in per_preference_methods():
            raise ValueError(f"algo={self.algo!r}: available per-preference trainers: {per_preference_methods()}")
        section = recipe(self.algo).section
        recipe(self.algo).check_section(self.policy_training, section)
        self.resources.validate("resources")
        if not self.base_policy:
            self.sft.validate()
        per_step = self.policy_training.micro_batch_size * self.resources.num_workers
        if not self.psoups_files and self.pairs_per_preference < per_step:
            raise ValueError(f"pairs_per_preference={self.pairs_per_preference}: fewer than one "
                             f"step's pairs ({section}.micro_batch_size={self.policy_training.micro_batch_size}"
                             f" x resources.num_workers={self.resources.num_workers})")
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"merge_method={self.merge_method!r}: must be one of {list(MERGE_METHODS)}")
        if not 0.0 < self.merge_density <= 1.0:
            raise ValueError(f"merge_density={self.merge_density}: must be in (0, 1]")
        self.eval.validate()
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds}: must be >= 1")
        if self.max_concurrent_runs < 0:
            raise ValueError(f"max_concurrent_runs={self.max_concurrent_runs}: must be >= 0 "
                             "(0 = as many as the cluster holds)")
        if self.pairs_source not in PAIRS_SOURCES:
            raise ValueError(f"pairs_source={self.pairs_source!r}: one of {list(PAIRS_SOURCES)}")
        pool = self.pairs_source == "pool" and not self.psoups_files
        if pool:
            self.pool.validate()
            if not self.base_policy:
                raise ValueError("pairs_source=pool: the pool's answers are real text; set base_policy "
                                 "(e.g. smollm2-135m-instruct, the pool's model) for the policies")
            if not self.eval.text_judges and not self.eval.judge_model:
                raise ValueError("pairs_source=pool: judge the policies by the text judges that "
                                 "labelled the pairs (eval.text_judges=true) or an LM judge")
            if self.algo not in pair_methods():
                # PPO's reward is the simulated world's judge, which cannot read the pool's text
                raise ValueError(f"pairs_source=pool: algo={self.algo!r} does not learn from pairs; "
                                 f"use one of {pair_methods()}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise={self.label_noise}: must be in [0, 0.5)")
        if (self.psoups_files or self.base_policy) and not (self.eval.judge_model or self.eval.text_judges):
            raise ValueError("eval.judge_model: with real data (psoups_files or base_policy) the "
                             "simulated world's judges cannot score the policies; name a judge "
                             "LM (a Hugging Face id or folder, or 'tiny' for a smoke test) or set "
                             "eval.text_judges=true")
        if self.eval.text_judges and self.eval.judge_model:
            raise ValueError(f"eval.text_judges and eval.judge_model={self.eval.judge_model!r}: "
                             "choose one judge")
        if self.eval.text_judges and not self.base_policy:
            raise ValueError("eval.text_judges: the text judges read real English; the tiny base "
                             "writes the world's word lists (set base_policy)")
        if self.eval.text_judges:
            from raypref.data.users import text_attribute

            for name in self.preferences:
                text_attribute(name)  # P3C / P3D have no text judge: an error naming them
        if self.base_policy and not self.eval.prompts_file and not pool:
            raise ValueError("eval.prompts_file: a Hugging Face base_policy needs real "
                             "evaluation prompts (.txt or .jsonl), not the world's word lists")
        if not self.preferences:
            raise ValueError("preferences: at least one preference is needed")
        unknown = sorted(set(self.preferences) - known)
        if unknown:
            raise ValueError(f"preferences: unknown {unknown}; known: {sorted(known)}")
        extra = sorted(set(self.preferences) - {p.name for p in psoups_profiles()})
        if extra and not self.psoups_files and not self.sft.extra_styles:
            raise ValueError(f"preferences: {extra} (P-Soups §B.2) need the world's extra styles: "
                             "set sft.extra_styles=true (configs/soups-16.yaml)")
        for i, combo in enumerate(self.combinations):
            missing = sorted(set(combo) - set(self.preferences))
            if missing:
                raise ValueError(f"combinations[{i}]={combo}: {missing} not in preferences")
        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            raise ValueError(f"baselines: unknown {bad}; known: {list(BASELINES)}")
        if self.user_weights:
            from raypref.models.merge import MergeError, validate_weights

            try:
                validate_weights(self.user_weights, self.preferences)
            except MergeError as e:
                raise ValueError(f"user_weights={self.user_weights}: {e}") from None
        if self.user_target:
            stray = sorted(set(self.user_target) - set(self.preferences))
            if stray:
                raise ValueError(f"user_target: {stray} are not in preferences {self.preferences}; "
                                 "the user's soup cannot hold them")
            if any(w < 0 for w in self.user_target.values()) or sum(self.user_target.values()) <= 0:
                raise ValueError(f"user_target={self.user_target}: weights must be >= 0, not all 0")
            if not self.user_weights:
                raise ValueError("user_target: needs user_weights (the soup it scores)")
            if self.eval.judge_model or self.eval.text_judges or self.psoups_files:
                raise ValueError("user_target: the user's score reads the simulated world's judges; "
                                 "not available with eval.judge_model, eval.text_judges or psoups_files")
        if not 0.0 <= self.max_quarantine_fraction <= 1.0:
            raise ValueError(f"max_quarantine_fraction={self.max_quarantine_fraction}: must be in [0, 1]")
        if self.psoups_format not in ("psoups", "trl"):
            raise ValueError(f"psoups_format={self.psoups_format!r}: one of psoups, trl")
        stray = sorted(set(self.psoups_files) - set(self.preferences))
        if stray:
            raise ValueError(f"psoups_files: {stray} are not in preferences {self.preferences}")
        if self.psoups_files and "pmorl" in self.baselines:
            raise ValueError("baselines: 'pmorl' labels pairs with the simulated world's judges; "
                             "with psoups_files (real data) drop it or add a reward model")
        for name, mode in self.inject_failures.items():
            if mode not in ("once", "always"):
                raise ValueError(f"inject_failures.{name}={mode!r}: use 'once' or 'always'")
