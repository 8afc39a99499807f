"""Feature scorers for real images (DESIGN section 7, Stable Diffusion profile).

In the toy world the judge's features are the similarity space of ``sim_c``. For real images the
judge is replaced by three standard feature spaces, each loaded from a LOCAL path named in
``params.eval_models`` (never from a model hub):

- CLIP image embeddings (``eval_models.clip_dir``, e.g. openai/clip-vit-large-patch14),
- DINO or DINOv2 CLS embeddings (``eval_models.dino_dir``, e.g. facebook/dino-vits16),
- LPIPS distance with its AlexNet backbone (``eval_models.lpips_weights``, one safetensors file).

``clip_similarity`` and ``dino_similarity`` are the mean cosine similarity over every (generated,
reference) pair, the same quantity as the toy ``sim`` metric (:func:`metrics.mean_cosine_similarity`);
``lpips_similarity`` is ``1 - LPIPS`` averaged over every pair. Images are uint8 ``(N, 3, H, W)``
as :func:`sampling.sample_images` returns them, or floats in [0, 1]. Resizing and normalization
are done here in torch (no torchvision, no transformers image processor); the mean, std and sizes
come from the folder's ``preprocessor_config.json`` when it has one, else from the model family's
published defaults.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# what to download for each params key, and how (on a machine with network access)
DOWNLOADS = {
    "eval_models.clip_dir": (
        "a CLIP model folder",
        "download openai/clip-vit-large-patch14 with `huggingface-cli download openai/clip-vit-large-patch14 "
        "--local-dir {path}` on a machine with network access, then copy the folder here",
    ),
    "eval_models.dino_dir": (
        "a DINO model folder",
        "download facebook/dino-vits16 (or a DINOv2 model such as facebook/dinov2-base) with "
        "`huggingface-cli download facebook/dino-vits16 --local-dir {path}` on a machine with network access, "
        "then copy the folder here",
    ),
    "eval_models.lpips_weights": (
        "an LPIPS (AlexNet) safetensors weights file",
        "on a machine with network access, `pip install lpips torchvision` and run `python -c \"import lpips; "
        "from safetensors.torch import save_file; m = lpips.LPIPS(net='alex'); save_file({{k: v.contiguous() "
        "for k, v in m.state_dict().items() if not k.startswith('lins.')}}, '{path}')\"`, then copy the file here",
    ),
    "paths.real_concepts": (
        "a folder of concept folders (images plus metadata.csv with file_name,prompt) or a MIMA concept-list JSON",
        "copy your concept folders into {path} (the MIMA sample data: `cp -r ../shared/datasets/wikiart_relearn/. {path}/`, "
        "or `dvc pull data.dvc` from your DVC remote), then version them with `dvc add {path}`",
    ),
    "model.pretrained_dir": (
        "a Stable Diffusion v1.x folder in diffusers layout",
        "download stable-diffusion-v1-5/stable-diffusion-v1-5 (or CompVis/stable-diffusion-v1-4) with "
        "`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir {path} "
        "--exclude '*.ckpt' '*.bin' '*fp16*' '*non_ema*'` on a machine with network access, then copy the folder here",
    ),
}


def missing_path_message(key: str, path: str | Path | None) -> str:
    """``<key>: <path> not found; <what to download and where to put it>``."""
    what, how = DOWNLOADS[key]
    if path is None:
        return f"{key} is not set: it must name {what}; set it in params.yaml or the profile, and {how.format(path='<that path>')}"
    return f"{key}: {path} not found (it must be {what}); {how.format(path=path)}"


def require_path(key: str, path: str | Path | None, kind: str = "dir") -> Path:
    """``path`` as a Path when it exists as a folder (``kind='dir'``) or file (``'file'``); else a
    FileNotFoundError naming the params key, the path and what to download."""
    if path is None:
        raise FileNotFoundError(missing_path_message(key, None))
    p = Path(path)
    ok = p.is_dir() if kind == "dir" else p.is_file()
    if not ok:
        raise FileNotFoundError(missing_path_message(key, path))
    return p


# ---------------------------------------------------------------------------------------------
# preprocessing in torch


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float in [0, 1]; float input is taken as already in [0, 1]."""
    if not torch.is_tensor(images):
        images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0, 1)


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its input: resize (the shortest edge to ``resize``, or exactly to
    ``(resize, resize)`` when ``shortest_edge`` is false), centre crop to ``crop`` (None: none), then
    ``(x - mean) / std``."""

    resize: int
    crop: Optional[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shortest_edge: bool = True
    mode: str = "bicubic"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images)
        h, w = x.shape[-2:]
        if self.shortest_edge:
            scale = self.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
        else:
            size = (self.resize, self.resize)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            h, w = x.shape[-2:]
            if h < self.crop or w < self.crop:
                raise ValueError(f"cannot centre-crop {h}x{w} to {self.crop}")
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[..., top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def _edge(value, default: int, int_is_shortest: bool = True) -> tuple[int, bool]:
    """A processor config's ``size``/``crop_size`` entry -> (pixels, is_shortest_edge). A bare
    integer (older feature-extractor configs) means the shortest edge for CLIP and the exact square
    size for ViT: ``int_is_shortest`` says which."""
    if value is None:
        return default, True
    if isinstance(value, int):
        return value, int_is_shortest
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), True
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ValueError(f"non-square size {value} is not supported")
            return int(value["height"]), False
    raise ValueError(f"unreadable size entry {value!r}")


def read_preprocess(folder: Path, default: Preprocess) -> Preprocess:
    """The folder's ``preprocessor_config.json`` as a :class:`Preprocess`; ``default`` for every
    entry it does not give (or for all of them when the file is absent)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return default
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    resize, shortest = _edge(cfg["size"], default.resize, default.shortest_edge) if "size" in cfg else (default.resize, default.shortest_edge)
    crop = default.crop
    if cfg.get("do_center_crop") is False:
        crop = None
    elif "crop_size" in cfg:
        crop = _edge(cfg["crop_size"], default.crop or resize)[0]
    if cfg.get("do_resize") is False:
        raise ValueError(f"{path}: do_resize false is not supported (images must be brought to the model's size)")
    mode = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample"), default.mode)
    mean = tuple(float(v) for v in cfg.get("image_mean", default.mean))
    std = tuple(float(v) for v in cfg.get("image_std", default.std))
    if cfg.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocess(resize, crop, mean, std, shortest, mode)


# ---------------------------------------------------------------------------------------------
# CLIP and DINO encoders


def _read_config(folder: Path, key: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {folder} has no config.json, so it is not a transformers model folder; "
                                + DOWNLOADS[key][1].format(path=folder))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _load_checked(cls, folder: Path, key: str, **kwargs):
    """``cls.from_pretrained(folder, local_files_only=True)``; weights the folder does not hold (the
    layers would stay random and the scores meaningless) are an error naming them."""
    model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", []) or [])
    missing += sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", []) or [])
    if missing:
        raise ValueError(f"{key}: {folder} lacks weights for {len(missing)} tensors of {cls.__name__} "
                         f"(e.g. {', '.join(missing[:3])}); point it at a complete model folder")
    return model.eval().requires_grad_(False)


@dataclass
class ImageEncoder:
    """A frozen image model and its preprocessing; ``embed`` gives one vector per image."""

    kind: str  # "clip" | "dino"
    model: torch.nn.Module
    preprocess: Preprocess
    folder: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Float32 embeddings ``(N, D)`` on the CPU (not normalized)."""
        images = to_unit_float(images)
        out = []
        for i in range(0, len(images), batch_size):
            x = self.preprocess(images[i : i + batch_size]).to(self.device, self.dtype)
            if self.kind == "clip":
                feats = self.model(pixel_values=x).image_embeds
            else:  # the CLS token of the last (layer-normed) hidden states
                feats = self.model(pixel_values=x).last_hidden_state[:, 0]
            out.append(feats.float().cpu())
        if not out:
            raise ValueError(f"{self.kind} embed: no images")
        return torch.cat(out)

    def similarity(self, images: torch.Tensor, reference_images: torch.Tensor) -> float:
        """Mean cosine similarity over every (image, reference image) pair, in [-1, 1]."""
        from .metrics import mean_cosine_similarity

        return mean_cosine_similarity(self.embed(images), self.embed(reference_images))


def load_clip(folder: str | Path | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              key: str = "eval_models.clip_dir") -> ImageEncoder:
    """A CLIP image encoder with its projection (``CLIPVisionModelWithProjection``) from a local folder
    holding a full ``CLIPModel`` or a vision-only model with projection."""
    from transformers import CLIPVisionModelWithProjection

    folder = require_path(key, folder)
    cfg = _read_config(folder, key)
    if cfg.get("model_type") not in ("clip", "clip_vision_model"):
        raise ValueError(f"{key}: {folder} holds a {cfg.get('model_type')!r} model, not CLIP; "
                         + DOWNLOADS[key][1].format(path=folder))
    kwargs = {}
    if cfg["model_type"] == "clip":
        # a full CLIPModel folder: take its vision tower's config, with the projection width
        # (stored at the top level) carried over, and load only the vision weights
        from transformers import CLIPConfig

        full = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        kwargs["config"] = vision
    model = _load_checked(CLIPVisionModelWithProjection, folder, key, dtype=dtype, **kwargs).to(device)
    size = int(model.config.image_size)
    default = Preprocess(size, size, CLIP_MEAN, CLIP_STD, True, "bicubic")
    return ImageEncoder("clip", model, read_preprocess(folder, default), folder)


def load_dino(folder: str | Path | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              key: str = "eval_models.dino_dir") -> ImageEncoder:
    """A DINO (``ViTModel``, e.g. facebook/dino-vits16) or DINOv2 (``Dinov2Model``) encoder from a
    local folder; the embedding is the CLS token."""
    from transformers import Dinov2Model, ViTModel

    folder = require_path(key, folder)
    cfg = _read_config(folder, key)
    kind = cfg.get("model_type")
    if kind == "dinov2":
        model = _load_checked(Dinov2Model, folder, key, dtype=dtype)
        # DINOv2 is trained at 224 and evaluated by resizing to 256 and cropping 224 (its config's
        # image_size, 518, is the positional grid, interpolated to any input)
        crop = min(int(model.config.image_size), 224)
        default = Preprocess(round(crop * 256 / 224), crop, IMAGENET_MEAN, IMAGENET_STD, True, "bicubic")
    elif kind == "vit":
        model = _load_checked(ViTModel, folder, key, dtype=dtype, add_pooling_layer=False)
        size = int(model.config.image_size)
        default = Preprocess(size, None, IMAGENET_MEAN, IMAGENET_STD, False, "bilinear")
    else:
        raise ValueError(f"{key}: {folder} holds a {kind!r} model; expected DINO (model_type 'vit') or DINOv2 ('dinov2'); "
                         + DOWNLOADS[key][1].format(path=folder))
    return ImageEncoder("dino", model.to(device), read_preprocess(folder, default), folder)


def clip_similarity(images: torch.Tensor, reference_images: torch.Tensor, encoder: ImageEncoder) -> float:
    """sim_c in CLIP image space: mean cosine similarity of every (generated, reference) pair."""
    if encoder.kind != "clip":
        raise ValueError(f"clip_similarity: got a {encoder.kind} encoder")
    return encoder.similarity(images, reference_images)


def dino_similarity(images: torch.Tensor, reference_images: torch.Tensor, encoder: ImageEncoder) -> float:
    """sim_c in DINO space: mean cosine similarity of every (generated, reference) pair."""
    if encoder.kind != "dino":
        raise ValueError(f"dino_similarity: got a {encoder.kind} encoder")
    return encoder.similarity(images, reference_images)


# ---------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, version 0.1, AlexNet backbone), weights from one safetensors file

# AlexNet's convolutions as (name in the lpips package's state dict, in, out, kernel, stride, padding);
# a max pool (3, stride 2) comes before slices 2 and 3
_ALEX = (
    ("slice1.0", 3, 64, 11, 4, 2),
    ("slice2.3", 64, 192, 5, 1, 2),
    ("slice3.6", 192, 384, 3, 1, 1),
    ("slice4.8", 384, 256, 3, 1, 1),
    ("slice5.10", 256, 256, 3, 1, 1),
)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(torch.nn.Module):
    """The LPIPS metric: unit-normalized AlexNet activations after each of its five ReLU stages,
    squared differences weighted per channel by learned 1x1 weights, averaged over space and summed
    over stages. Inputs in [0, 1] (scaled to [-1, 1] here). Built empty; :func:`load_lpips` fills it."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _ALEX)
        self.lins = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(1, o, 1, 1)) for _, _, o, _, _, _ in _ALEX)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (to_unit_float(images).to(self.shift.device, self.shift.dtype) * 2 - 1 - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    @staticmethod
    def _distance(fa: list[torch.Tensor], fb: list[torch.Tensor], lins) -> torch.Tensor:
        return sum(((a - b).pow(2) * w).sum(1).mean((-2, -1)) for a, b, w in zip(fa, fb, lins))

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair ``(a[i], b[i])``: shape ``(N,)``."""
        return self._distance(self.features(a), self.features(b), self.lins)


def load_lpips(path: str | Path | None, device: str | torch.device = "cpu", key: str = "eval_models.lpips_weights") -> LPIPS:
    """LPIPS from a safetensors file holding the ``lpips`` package's ``LPIPS(net='alex')`` state dict
    (``net.slice<k>.<i>.weight/bias`` and ``lin<k>.model.1.weight`` or ``lins.<k>.model.1.weight``)."""
    from .artifacts import load_weights

    path = require_path(key, path, kind="file")
    state = load_weights(path)
    model = LPIPS()
    new = {}
    for k, (name, i, o, ks, _, _) in enumerate(_ALEX):
        for part, shape in (("weight", (o, i, ks, ks)), ("bias", (o,))):
            src = f"net.{name}.{part}"
            if src not in state:
                raise ValueError(f"{key}: {path} has no tensor {src!r}; it must hold LPIPS(net='alex') weights. "
                                 + DOWNLOADS[key][1].format(path=path))
            if tuple(state[src].shape) != shape:
                raise ValueError(f"{key}: {path}: {src} has shape {tuple(state[src].shape)}, expected {shape}")
            new[f"convs.{k}.{part}"] = state[src]
        lin = next((state[n] for n in (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight") if n in state), None)
        if lin is None:
            raise ValueError(f"{key}: {path} has no tensor 'lin{k}.model.1.weight' (the LPIPS linear weights); "
                             + DOWNLOADS[key][1].format(path=path))
        if tuple(lin.shape) != (1, o, 1, 1):
            raise ValueError(f"{key}: {path}: lin{k}.model.1.weight has shape {tuple(lin.shape)}, expected {(1, o, 1, 1)}")
        new[f"lins.{k}"] = lin
    new["shift"], new["scale"] = model.shift, model.scale
    model.load_state_dict({k: v.float() for k, v in new.items()})
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips_similarity(images: torch.Tensor, reference_images: torch.Tensor, model: LPIPS, batch_size: int = 16) -> float:
    """``1 - LPIPS`` averaged over every (generated, reference) pair; reference images of another
    size are resized to the generated images' size first."""
    images, reference_images = to_unit_float(images), to_unit_float(reference_images)
    if reference_images.shape[-2:] != images.shape[-2:]:
        reference_images = F.interpolate(reference_images, size=images.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
    ref = [torch.cat(f) for f in zip(*(model.features(reference_images[j : j + batch_size]) for j in range(0, len(reference_images), batch_size)))]
    total, count = 0.0, 0
    for i in range(0, len(images), batch_size):
        for one in zip(*model.features(images[i : i + batch_size])):  # one image's stage features
            d = model._distance([f.unsqueeze(0) for f in one], ref, model.lins)
            total += float(d.sum())
            count += d.numel()
    if count == 0:
        raise ValueError("lpips_similarity: no images")
    return 1.0 - total / count


# ---------------------------------------------------------------------------------------------
# all scorers of a profile


@dataclass
class FeatureScorers:
    """The SD profile's feature scorers; ``lpips`` is None when no weights file is configured."""

    clip: ImageEncoder
    dino: ImageEncoder
    lpips: Optional[LPIPS] = None

    def scores(self, images: torch.Tensor, reference_images: torch.Tensor) -> dict[str, float]:
        """``clip_sim``, ``dino_sim`` and (when LPIPS is loaded) ``lpips_sim`` = 1 - LPIPS of one
        concept's generated images against its reference images."""
        out = {
            "clip_sim": clip_similarity(images, reference_images, self.clip),
            "dino_sim": dino_similarity(images, reference_images, self.dino),
        }
        if self.lpips is not None:
            out["lpips_sim"] = lpips_similarity(images, reference_images, self.lpips)
        return out


def load_scorers(cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FeatureScorers:
    """Load every scorer named in ``params.eval_models`` (an :class:`config.EvalModelsConfig`). CLIP
    and DINO are required; LPIPS is loaded when ``lpips_weights`` is set and skipped (with a log
    warning, and no ``lpips_sim`` in the scores) when it is null."""
    clip = load_clip(cfg.clip_dir, device, dtype)
    dino = load_dino(cfg.dino_dir, device, dtype)
    lp = None
    if cfg.lpips_weights is None:
        log.warning("eval_models.lpips_weights is not set: LPIPS is skipped. %s", DOWNLOADS["eval_models.lpips_weights"][1].format(path="<file>"))
    else:
        lp = load_lpips(cfg.lpips_weights, device)
    return FeatureScorers(clip, dino, lp)


__all__ = [
    "Preprocess", "ImageEncoder", "LPIPS", "FeatureScorers", "load_clip", "load_dino", "load_lpips", "load_scorers",
    "clip_similarity", "dino_similarity", "lpips_similarity", "missing_path_message", "require_path",
]
