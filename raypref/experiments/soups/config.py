"""The Personalized Soups job config: every default runs on one CPU machine in minutes."""
from __future__ import annotations

from dataclasses import dataclass, field

from raypref.data.users import psoups_combinations, psoups_profiles
from raypref.models.factory import LoraSettings
from raypref.recipes.sft import SFTConfig
from raypref.experiments.soups.evaluate import EvalConfig

ALGOS = ("dpo",)  # per-preference trainers (soups.run.PER_PREFERENCE_TRAINERS); "ppo" to come
BASELINES = ("sft", "prompting", "pmorl")


@dataclass
class PreferenceTraining:
    """How each per-preference policy (and the P-MORL baseline) is trained."""

    pairs_per_preference: int = 1600   # simulated pairs; 10% more are drawn as held-out
    steps: int = 200                    # optimizer steps per policy
    micro_batch_size: int = 8           # pairs per step per worker
    lr: float = 5e-4                    # PLATFORM-NOTES probe: 2e-3 with beta 0.1 degenerated
    beta: float = 0.5
    loss_type: str = "sigmoid"          # "sigmoid" (DPO) or "ipo"
    max_length: int = 128
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    warmup_steps: int = 10


@dataclass
class PreferenceResources:
    """Ray resources of *each* per-preference run (all of them run at once)."""

    num_workers: int = 1
    cpus_per_worker: float = 0.25       # 7 concurrent runs share 2 cores on the default
    use_gpu: bool = False
    zero_stage: int = 0                 # LoRA states are tiny; ZeRO-2/3 for big bases
    bf16: bool = False                  # on for GPUs that support it
    max_failures: int = 1               # restarts from the latest checkpoint before giving up
    checkpoint_every: int = 25


@dataclass
class SoupsConfig:
    """Personalized Soups (seed 002): per-preference policies, trained concurrently, merged post hoc."""

    output_dir: str = "outputs/soups"
    seed: int = 0
    algo: str = "dpo"
    preferences: list[str] = field(default_factory=lambda: [p.name for p in psoups_profiles()])
    # soups to build and compare; default: the 8 combinations of 002 Table 4 (uniform weights)
    combinations: list[list[str]] = field(default_factory=psoups_combinations)
    # an extra user's soup, e.g. {"P1A": 0.5, "P2B": 0.3, "P3A": 0.2}
    user_weights: dict[str, float] = field(default_factory=dict)
    merge_method: str = "exact_lora"    # see raypref.models.merge.METHODS
    merge_density: float = 0.5          # ties / dare only
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # real data: {preference: P-Soups preference file or hub dataset}; empty = simulated world
    psoups_files: dict[str, str] = field(default_factory=dict)
    # the shared base of every policy: "" = warm-start the tiny model on the world (`sft`),
    # else a Hugging Face id or local folder used as is (e.g. an instruction-tuned 7B)
    base_policy: str = ""
    sft: SFTConfig = field(default_factory=SFTConfig)
    training: PreferenceTraining = field(default_factory=PreferenceTraining)
    resources: PreferenceResources = field(default_factory=PreferenceResources)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register_models: bool = True        # merged soups into the MLflow model registry
    # testing the failure path: these runs crash ("once": first attempt only, "always")
    inject_failures: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        known = {p.name for p in psoups_profiles()}
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r}: available per-preference trainers: {ALGOS}")
        if not self.preferences:
            raise ValueError("preferences: at least one preference is needed")
        unknown = sorted(set(self.preferences) - known)
        if unknown:
            raise ValueError(f"preferences: unknown {unknown}; known: {sorted(known)}")
        for i, combo in enumerate(self.combinations):
            missing = sorted(set(combo) - set(self.preferences))
            if missing:
                raise ValueError(f"combinations[{i}]={combo}: {missing} not in preferences")
        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            raise ValueError(f"baselines: unknown {bad}; known: {list(BASELINES)}")
        if self.user_weights:
            from raypref.models.merge import validate_weights

            validate_weights(self.user_weights, self.preferences)
        if self.psoups_files and "pmorl" in self.baselines:
            raise ValueError("baselines: 'pmorl' labels pairs with the simulated world's judges; "
                             "with psoups_files (real data) drop it or add a reward model")
        for name, mode in self.inject_failures.items():
            if mode not in ("once", "always"):
                raise ValueError(f"inject_failures.{name}={mode!r}: use 'once' or 'always'")
