"""Configuration: ``params.yaml`` (plus an optional profile overlay) -> frozen dataclasses.

Config flows one way. A YAML file is parsed once, an optional overlay from ``profiles/`` replaces
only the keys it names, dotted overrides (the notebooks' ``overrides`` parameter) are applied
last, and the result is checked key by key against the dataclasses below. An unknown or misspelt
key, or a value of the wrong type, is an error that names the key and the file it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ParamsError(ValueError):
    """A params file (or override) has an unknown key, a wrong type or a bad value."""


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = "data/toy"  # the generated toy world
    models_dir: str = "models"  # base model, judge and later stages' models
    reports_dir: str = "reports"  # metrics, figures, executed notebooks
    clip_vocab: str = ".cache/clip/bpe_simple_vocab_16e6.txt.gz"  # CLIP BPE file (see `make setup`)
    # real concept images (world.real): a folder of concept folders, each with images and a
    # metadata.csv (file_name,prompt), or a MIMA concept-list JSON; versioned by data.dvc
    real_concepts: str = "data/concepts"


@dataclass(frozen=True)
class WorldConfig:
    """The toy world (DESIGN section 4)."""

    image_size: int = 32
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    styles: tuple[str, ...] = ("solid", "striped", "dotted", "outlined")
    personal: tuple[str, ...] = ("p1", "p2")
    position_jitter: float = 0.3  # 0: every shape centred; 1: anywhere it fits
    max_rotation: float = 15.0  # degrees either way
    min_radius: float = 0.3  # smallest shape radius as a share of the image (largest: 0.42)
    # images per subject (shape or personal subject) in each split; personal subjects get no pretrain
    pretrain_per_shape: int = 600
    defense_per_subject: int = 24
    attack_per_subject: int = 24
    reference_per_subject: int = 64
    judge_train_per_subject: int = 250
    judge_test_per_subject: int = 60
    # real concepts (DESIGN section 4's real-image path): folder names under paths.real_concepts;
    # each is a subject like a shape (pretrained, erasable, judged), drawn as random crops of its
    # images. real_holdout images per concept are kept for judge_test and reference only.
    real: tuple[str, ...] = ()
    real_holdout: int = 4
    # generic two-shape images the VAE also trains on (data.draw_codec); 0: pretrain images only
    codec_images: int = 0
    # captioned two-shape composites the UNet also pretrains on (data.draw_composite); 0: none
    pretrain_composites: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """The tiny Stable-Diffusion-architecture model, or a local SD v1.x folder."""

    pretrained_dir: Optional[str] = None  # a diffusers folder; null builds the tiny model
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 128
    max_length: int = 77
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclass(frozen=True)
class PretrainConfig:
    """Base-model pretraining on the toy world's pretrain split."""

    vae_steps: int = 700
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1200
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    unet_warmup_steps: int = 100
    loss_weighting: str = "v"  # "v": epsilon loss weighted by 1/abar_t (the v-prediction loss); "none"
    train_text_encoder: bool = True  # False keeps the text encoder at its seeded random weights
    caption_dropout: float = 0.1  # share of empty captions, for classifier-free guidance
    ema_decay: float = 0.99
    # torch's fused AdamW and diffusers' foreach EMA update: the same update rule, ~12% faster per
    # UNet step on the CPU, but rounded differently, so a model trained with it is not bit-identical
    fused_optimizer: bool = False


@dataclass(frozen=True)
class JudgeConfig:
    """The toy world's judge: subject, color and style heads with a reject option."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    feature_dim: int = 128
    reject_threshold: float = 0.5  # a subject verdict below this confidence counts as "other"
    other_share: float = 0.2  # share of each batch drawn from the "other" class


@dataclass(frozen=True)
class SamplingConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    samples_per_concept: int = 64
    batch_size: int = 64
    seed: int = 1234


@dataclass(frozen=True)
class ThreatConfig:
    """One threat model's target concepts (DESIGN section 5)."""

    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class EraseConfig:
    """UCE erasure of the re-learning targets (DESIGN section 6)."""

    guide_word: str = "shape"
    # real concepts (world.real): empty guides each prompt's concept words to guide_word in the same
    # prompt; a prompt here guides the whole prompt, from its first word, to it
    real_guide: str = ""
    lam: float = 0.1
    preserve_scale: float = 0.1


METHODS = ("mima", "imma", "imma_joint", "imma_sequential")
THREATS = ("relearn", "personalize")
ATTACKS = ("full", "lora", "dreambooth", "dreambooth_lora", "textual_inversion", "custom_diffusion")


# the rows of a target prompt, from its concept word on, that enter the merge (immunize.merge_rows)
# or that mci_lib.erase.token_rows returns: to the end of the sequence, or to the end-of-text token
TOKEN_ROWS = ("sequence", "prompt")

# the simulated attacker's parameter sets (immunize.inner_params): a UNet set (lora: low-rank
# factors on every attention projection, as the LoRA attack trains), optionally with the input
# embeddings of the concept words (+token, as Custom Diffusion and Textual Inversion train one),
# or those embeddings alone
UNET_SETS = ("kv", "cross_attn", "unet", "lora")
INNER_PARAMS = (*UNET_SETS, "token", *(f"{s}+token" for s in UNET_SETS))

# immunize keys that may differ per threat (a mapping threat -> value; see for_threat)
PER_THREAT = ("steps", "inner_update", "inner_lr", "inner_params", "outer_params", "utility_weight", "mixed_precision")


@dataclass(frozen=True)
class ImmunizeConfig:
    """IMMA / MIMA and their baselines (DESIGN section 6)."""

    methods: tuple[str, ...] = ("mima", "imma_joint", "imma_sequential")
    mode: str = "second_order"  # second_order | first_order | alternating
    # The keys of PER_THREAT (outer steps, the attacker's update rule, step size and parameter
    # set, the immunized set, the utility weight, the precision) take one value for every threat
    # or a mapping threat -> value, resolved per run by :func:`for_threat`; a profile or override
    # that sets one value sets it for every threat.
    steps: Union[int, dict[str, int]] = 100
    batch_size: int = 4  # per concept, inner and outer
    inner_lr: Union[float, dict[str, float]] = 0.01
    inner_steps: int = 1
    inner_update: Union[str, dict[str, str]] = "sgd"  # sgd | sign | adam
    # second_order only: how many of the last attacker steps the outer gradient differentiates
    # through (0: all of them); the earlier steps' gradients are held constant, as first_order
    # holds every step's, so only the last steps' Hessian terms are kept (truncated unrolling)
    second_order_steps: int = 0
    # fp32 | bf16: the UNet passes of every outer step under torch.autocast in bfloat16 (the diffusers
    # examples' --mixed_precision); the immunized weights, the optimizer and the merge (float64)
    # keep their precision
    mixed_precision: Union[str, dict[str, str]] = "fp32"
    # kv | cross_attn | unet | lora, each optionally +token, or token alone (INNER_PARAMS): +token
    # also learns the input embedding of each concept word of the concept's captions
    inner_params: Union[str, dict[str, str]] = "kv"
    # the lora attacker's rank (its factors start as peft's gaussian init: A normal with std 1/r, B zero)
    inner_lora_rank: int = 4
    # fixed | per_step: the lora attacker's A from one seed at every outer step, or a fresh A at
    # every outer step (seeded by the step's batch), as each real LoRA attack draws its own
    inner_lora_start: str = "fixed"
    outer_params: Union[str, dict[str, str]] = "cross_attn"  # kv | cross_attn | unet
    outer_lr: float = 1e-4
    prior_weight: float = 1.0
    utility: str = "denoise"  # denoise | distill: the outer objective's utility term
    utility_weight: Optional[Union[float, dict[str, float]]] = None  # its weight; null: prior_weight (DESIGN's lambda_pr in both places)
    # share of the prior (utility) captions left empty, so the utility term also holds the
    # unconditional prediction that classifier-free guidance subtracts at every sampling step
    utility_uncond: float = 0.0
    # the outer concept term: neg (-L at the merged attacker, unbounded), cap (-min(L, objective_cap)),
    # gap (-(L at the merged attacker - L at theta): the attacker's step must not help),
    # ratio (-(L at the merged attacker / L at theta), per concept: scale-free)
    objective: str = "neg"
    objective_cap: float = 1.0
    merge: str = "hard"  # hard | soft
    # the target rows that enter the merge's constraint, from each target prompt's concept word on:
    # sequence (to the end of the sequence, padding included) or prompt (to the end-of-text token,
    # as Custom Diffusion's and MIMA's merge take them)
    merge_rows: str = "sequence"
    merge_delta: float = 1e-3
    merge_lam: float = 100.0
    reg_captions: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 0  # write a resumable checkpoint every k outer steps (0: never)
    resume: bool = False  # continue from the last checkpoint in the run's checkpoint folder

    def __post_init__(self):
        choices = {
            "mode": ("second_order", "first_order", "alternating"),
            "inner_update": ("sgd", "sign", "adam"),
            "inner_params": INNER_PARAMS,
            "outer_params": ("kv", "cross_attn", "unet"),
            "merge": ("hard", "soft"),
            "merge_rows": TOKEN_ROWS,
            "inner_lora_start": ("fixed", "per_step"),
            "mixed_precision": ("fp32", "bf16"),
            "utility": ("denoise", "distill"),
            "objective": ("neg", "cap", "gap", "ratio"),
        }
        per_threat = {}
        for key in PER_THREAT:
            value = getattr(self, key)
            if isinstance(value, dict) and set(value) != set(THREATS):
                raise ParamsError(f"immunize.{key}: a mapping names every threat ({', '.join(THREATS)}) and nothing else; got {', '.join(value) or 'none'}")
            per_threat[key] = list(value.values()) if isinstance(value, dict) else [value]
        for key, allowed in choices.items():
            for value in per_threat.get(key, [getattr(self, key)]):
                if value not in allowed:
                    raise ParamsError(f"immunize.{key}: {value!r} is not one of {', '.join(allowed)}")
        for m in self.methods:
            if m not in METHODS:
                raise ParamsError(f"immunize.methods: unknown method {m!r}; known: {', '.join(METHODS)}")
        if min(per_threat["steps"]) < 1 or self.inner_steps < 1 or self.batch_size < 1:
            raise ParamsError("immunize.steps (each threat's), immunize.inner_steps and immunize.batch_size must be >= 1")
        if self.inner_lora_rank < 1:
            raise ParamsError(f"immunize.inner_lora_rank: {self.inner_lora_rank} must be >= 1")
        if not 0 <= self.second_order_steps <= self.inner_steps:
            raise ParamsError(f"immunize.second_order_steps: {self.second_order_steps} is not between 0 (every step) and immunize.inner_steps ({self.inner_steps})")
        if not 0.0 <= self.utility_uncond < 1.0:
            raise ParamsError(f"immunize.utility_uncond: {self.utility_uncond} is not a share in [0, 1)")


@dataclass(frozen=True)
class AttackLR:
    """Each attack's default learning rate (AdamW)."""

    full: float = 2e-4
    lora: float = 1e-3
    dreambooth: float = 1e-4
    dreambooth_lora: float = 1e-3
    textual_inversion: float = 5e-3
    custom_diffusion: float = 1e-3


@dataclass(frozen=True)
class AttackConfig:
    """The attack suite and its budgets (DESIGN section 7). Results at fewer steps are read off the
    ``checkpoints`` of one run (the learning rate is constant), so the steps axis of the budget
    sweep costs nothing extra."""

    relearn: tuple[str, ...] = ("full", "lora")
    personalize: tuple[str, ...] = ("dreambooth", "dreambooth_lora", "textual_inversion", "custom_diffusion")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 100
    checkpoints: tuple[int, ...] = (25, 50, 100)
    batch_size: int = 4
    lora_rank: int = 4
    prior_weight: float = 1.0
    class_images: int = 32
    # per non-target shape, for utility presence in the research study (benchmarks/study.py); the
    # pipeline's attack stages report the immunize stage's utility numbers
    utility_samples: int = 32
    # DDIM steps when scoring attack checkpoints and sampling class images; on the tiny model 8
    # steps give the same presence as 25 (measured: base and erased models, 4 shapes x 64 samples)
    num_inference_steps: int = 8
    # the attacker's loss weighting over timesteps: "none" (the plain epsilon loss of the diffusers
    # examples), "min_snr" (their --snr_gamma option) or "v" (the base model's own pretraining loss)
    loss_weighting: str = "none"
    snr_gamma: float = 5.0
    # DreamBooth kinds also train the text encoder (all of it; a LoRA for dreambooth_lora), as the
    # diffusers DreamBooth examples' --train_text_encoder does
    train_text_encoder: bool = False
    # embedding vectors Textual Inversion learns per placeholder (the diffusers textual-inversion
    # example's --num_vectors): the placeholder is written as that many new tokens
    num_vectors: int = 1
    lr: AttackLR = field(default_factory=AttackLR)
    sweep_attacks: tuple[str, ...] = ("lora", "dreambooth_lora")  # which attacks get the budget sweep (those the threat runs)
    sweep_lr_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    sweep_lora_ranks: tuple[int, ...] = (2, 4, 8)
    sweep_seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        for key in ("relearn", "personalize", "sweep_attacks"):
            for kind in getattr(self, key):
                if kind not in ATTACKS:
                    raise ParamsError(f"attack.{key}: unknown attack {kind!r}; known: {', '.join(ATTACKS)}")
        if self.steps < 1 or self.batch_size < 1 or not self.seeds:
            raise ParamsError("attack.steps and attack.batch_size must be >= 1 and attack.seeds non-empty")
        if self.num_inference_steps < 1:
            raise ParamsError(f"attack.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.num_vectors < 1:
            raise ParamsError(f"attack.num_vectors must be >= 1, got {self.num_vectors}")
        if self.loss_weighting not in ("none", "min_snr", "v"):
            raise ParamsError(f"attack.loss_weighting must be none, min_snr or v, got {self.loss_weighting!r}")
        late = [c for c in self.checkpoints if c < 1 or c > self.steps]
        if late:
            raise ParamsError(f"attack.checkpoints {late} fall outside 1..attack.steps ({self.steps})")


@dataclass(frozen=True)
class ScalingConfig:
    """Re-learning with N = 1..len(concepts) target shapes (the scaling figure): for each count in
    ``counts`` the first N ``concepts`` are erased from the base model, immunized with ``method``,
    and attacked with ``attack`` (its default budget) on ``attack.seeds[0]``, against the erased
    model without immunization."""

    concepts: tuple[str, ...] = ("star", "heart", "cross", "triangle")
    counts: tuple[int, ...] = (1, 2, 3, 4)
    method: str = "mima"
    attack: str = "lora"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ParamsError(f"scaling.method: unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.attack not in ATTACKS:
            raise ParamsError(f"scaling.attack: unknown attack {self.attack!r}; known: {', '.join(ATTACKS)}")
        bad = [n for n in self.counts if not 1 <= n <= len(self.concepts)]
        if bad:
            raise ParamsError(f"scaling.counts {bad} fall outside 1..{len(self.concepts)} (the number of scaling.concepts)")


@dataclass(frozen=True)
class EvalModelsConfig:
    """Feature scorers for real images (DESIGN section 7, Stable Diffusion profile): local folders
    only, never a hub. ``clip_dir``: a CLIP model folder (``transformers`` layout, e.g.
    openai/clip-vit-large-patch14); ``dino_dir``: a DINO or DINOv2 folder (e.g. facebook/dino-vits16);
    ``lpips_weights``: a safetensors file of LPIPS (AlexNet) weights. null: not used (the toy
    profile scores with its judge)."""

    clip_dir: Optional[str] = None
    dino_dir: Optional[str] = None
    lpips_weights: Optional[str] = None


@dataclass(frozen=True)
class Params:
    profile: str = "tiny"  # an overlay in profiles/<profile>.yaml ("tiny" overlays nothing)
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    paths: PathsConfig = field(default_factory=PathsConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    relearn: ThreatConfig = field(default_factory=lambda: ThreatConfig(("star", "heart")))
    personalize: ThreatConfig = field(default_factory=lambda: ThreatConfig(("p1", "p2")))
    erase: EraseConfig = field(default_factory=EraseConfig)
    immunize: ImmunizeConfig = field(default_factory=ImmunizeConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval_models: EvalModelsConfig = field(default_factory=EvalModelsConfig)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, source)
        # int | dict[str, int]: a mapping is checked as one (its errors name the entry), else the number
        mapping = [a for a in inner if typing.get_origin(a) is dict]
        if isinstance(value, dict) and mapping:
            return _coerce(value, mapping[0], key, source)
        scalar = [a for a in inner if typing.get_origin(a) is not dict]
        try:
            return _coerce(value, scalar[0], key, source)
        except ParamsError as err:
            if mapping:
                raise ParamsError(f"{err} (or a mapping of threats to it)") from None
            raise
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        _, elem = typing.get_args(tp)
        return {str(k): _coerce(v, elem, f"{key}.{k}", source) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{source}: key '{key}' must be a list, got {value!r}")
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ParamsError(
            f"{source}: unknown key '{key}'. Known keys here: {', '.join(sorted(names))}. "
            "Fix the spelling or remove it."
        )
    kwargs = {}
    for name in names & set(data):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name, source)
    return cls(**kwargs)


def _deep_update(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found. Run from the repository root or pass its path.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    return data


def resolve_profile(params_path: Path, profile: str | Path) -> Path:
    """The overlay file of ``profile``: a path to a YAML file, or a name looked up as
    ``profiles/<name>.yaml`` beside the params file."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ParamsError(f"profile {str(profile)!r}: file not found")
        return candidate
    folder = params_path.parent / "profiles"
    path = folder / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ParamsError(f"profile {str(profile)!r}: no {path}; known profiles: {', '.join(known) or 'none'}")
    return path


def load_params(
    path: str | Path = "params.yaml",
    profile: str | Path | None = None,
    overrides: dict[str, Any] | str | None = None,
) -> Params:
    """Read ``path``, overlay the profile (a YAML file of only the keys that differ: the
    ``profile`` argument, else the file's own ``profile`` key, e.g. ``dvc exp run -S profile=quick``),
    then apply dotted ``overrides`` such as ``{"pretrain.unet_steps": 10}``; return frozen
    :class:`Params`. ``overrides`` may also be that mapping written as JSON/YAML text, as
    ``papermill -p overrides '{"immunize.steps": 20}'`` passes it."""
    path = Path(path)
    data = _read_yaml(path)
    source = str(path)
    if isinstance(overrides, str):
        try:
            overrides = yaml.safe_load(overrides) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"overrides: {overrides!r} is not a JSON/YAML mapping of dotted keys ({err})") from err
    if not isinstance(overrides, (dict, type(None))):
        raise ParamsError(f"overrides: expected a mapping of dotted keys to values, got {overrides!r}")
    overrides = dict(overrides or {})
    profile = overrides.pop("profile", None) or profile or data.get("profile")
    if profile and profile != "tiny":  # "tiny" is params.yaml itself; no overlay file needed
        profile_path = resolve_profile(path, profile)
        overlay = _read_yaml(profile_path)
        if "profile" in overlay:
            raise ParamsError(f"{profile_path}: a profile cannot select another profile (remove its 'profile' key)")
        data = _deep_update(data, overlay)
        data["profile"] = Path(profile).stem
        source = f"{path} + {profile_path}"
    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    if overrides:
        source += " + overrides"
    return _build(Params, data, "", source)


def for_threat(params: Params, threat: str) -> Params:
    """``params`` for one threat's immunization: every ``immunize`` key of :data:`PER_THREAT` that
    is a mapping resolved to that threat's value (params.yaml sets re-learning and personalization
    apart; README, Results). Every entry point that immunizes calls it once, so the manifest
    records the values run."""
    if threat not in THREATS:
        raise ParamsError(f"threat {threat!r} is not one of {', '.join(THREATS)}")
    resolved = {k: v[threat] for k in PER_THREAT if isinstance(v := getattr(params.immunize, k), dict)}
    if not resolved:
        return params
    return dataclasses.replace(params, immunize=dataclasses.replace(params.immunize, **resolved))


def params_to_dict(params: Params) -> dict:
    """The resolved params as plain YAML-able data (tuples become lists), for manifests."""

    def convert(obj):
        if isinstance(obj, tuple):
            return [convert(v) for v in obj]
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return convert(dataclasses.asdict(params))


def check_paths(params: Params, root: str | Path | None = None) -> dict[str, Path]:
    """Check, before any work starts, every local path a profile needs; call it first in every
    entry point. ``model.pretrained_dir`` (when set) must be a diffusers SD folder; for such a real
    model the CLIP and DINO folders of ``eval_models`` are required, and ``eval_models.lpips_weights``
    is checked when set. Relative paths are taken from ``root`` (default: the working directory,
    the repository root under ``dvc repro``). Every problem is collected, then one
    FileNotFoundError names each params key, its path and what to download into it. Returns the
    checked paths by key (empty for the tiny profile)."""
    from .scorers import missing_path_message

    base = Path(root) if root is not None else Path.cwd()

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    problems: list[str] = []
    found: dict[str, Path] = {}
    if params.world.real:
        source = resolve(params.paths.real_concepts)
        if not source.exists():
            problems.append(missing_path_message("paths.real_concepts", params.paths.real_concepts) + f" (world.real names {', '.join(params.world.real)})")
        else:
            found["paths.real_concepts"] = source
    real = params.model.pretrained_dir is not None
    if real:
        folder = resolve(params.model.pretrained_dir)
        if not folder.is_dir():
            problems.append(missing_path_message("model.pretrained_dir", params.model.pretrained_dir))
        else:
            from .models import check_model_folder

            try:
                found["model.pretrained_dir"] = check_model_folder(folder)
            except FileNotFoundError as err:
                problems.append(f"model.pretrained_dir: {err}")
    em = params.eval_models
    for key, value, is_dir in (
        ("eval_models.clip_dir", em.clip_dir, True),
        ("eval_models.dino_dir", em.dino_dir, True),
        ("eval_models.lpips_weights", em.lpips_weights, False),
    ):
        if value is None:
            if real and is_dir:
                problems.append(missing_path_message(key, None) + " (a real model's samples are scored with it)")
            continue
        path = resolve(value)
        if is_dir and path.is_dir() and not (path / "config.json").is_file():
            problems.append(f"{key}: {value} has no config.json (not a transformers model folder); "
                            + missing_path_message(key, value).split("; ", 1)[1])
        elif not (path.is_dir() if is_dir else path.is_file()):
            problems.append(missing_path_message(key, value))
        else:
            found[key] = path
    if problems:
        raise FileNotFoundError(
            f"profile {params.profile!r}: {len(problems)} local path(s) missing; nothing is downloaded at run time "
            "(HF_HUB_OFFLINE=1):\n- " + "\n- ".join(problems)
        )
    return found
