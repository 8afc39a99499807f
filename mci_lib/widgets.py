"""The interactive concept explorer (``notebooks/concept_explorer.ipynb``, served by Voila).

Pick a concept, a model state and a range of sample seeds; see the samples as an image grid and
the judge's reading of them side by side, and sample any prompt live.

Model states:

- ``model`` states are diffusers folders found under ``models_dir`` (``base``, ``erased``,
  ``immunized/<threat>/<method>``); their images are sampled live with the concept's prompts
  (:func:`mci_lib.attacks.concept_prompts`) from the fixed seeds ``sampling.seed + i``, the same
  noise the attack stages score on.
- ``attacked`` states are read from the attack stages' kept samples,
  ``<reports_dir>/figures/attack_<threat>/samples.safetensors``: one state per (attack, method,
  step), one grid row per attack seed. Sample ``i`` of a stored tensor is the one drawn from seed
  ``sampling.seed + i``, so the seed range selects the same samples in both kinds of state.

Everything here except :func:`explorer_ui` is a plain function of its arguments, and reads only the
folders and files it is handed. :func:`explorer_ui` wires those functions to ipywidgets.
"""

from __future__ import annotations

import html
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

THREATS = ("relearn", "personalize")
SAMPLE_KEY = re.compile(r"^(?P<attack>[^/]+)/(?P<method>[^/]+)/seed(?P<seed>\d+)/step(?P<step>\d+)/(?P<concept>[^/]+)$")
MAX_SAMPLES = 64  # the seed range slider's upper end


@dataclass(frozen=True, eq=False)
class State:
    """One model state the explorer can show.

    ``kind`` is ``"model"`` (a diffusers ``folder`` sampled live) or ``"attacked"`` (stored
    samples: ``images[concept][attack_seed]`` is uint8 ``[n, 3, H, W]``)."""

    label: str
    kind: str
    folder: Path | None = None
    threat: str | None = None
    method: str | None = None  # immunization method; "none" for the model without immunization
    attack: str | None = None
    step: int | None = None
    images: Mapping[str, Mapping[int, torch.Tensor]] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        """The concepts this state has stored samples of (empty for a live ``model`` state)."""
        return sorted(self.images)


# ----------------------------------------------------------------------------- paths and concepts


def find_params_file(params_file: str | Path, start: str | Path | None = None) -> Path:
    """The params file as an absolute path: ``params_file`` itself when it exists (relative to
    ``start``, default the working directory), else the same relative path in one of ``start``'s
    parent folders (Voila and JupyterLab run a notebook inside ``notebooks/``)."""
    path = Path(params_file)
    start = Path(start or os.getcwd()).resolve()
    if path.is_absolute():
        if path.is_file():
            return path
        raise FileNotFoundError(f"{path}: params file not found")
    for folder in (start, *start.parents[:2]):
        if (folder / path).is_file():
            return (folder / path).resolve()
    raise FileNotFoundError(f"{path}: params file not found in {start} or its two parent folders; pass params_file as an absolute path")


def resolve_dirs(params_path: str | Path, params, models_dir: str | Path | None = None, reports_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The models and reports folders: the ones given, else ``params.paths.models_dir`` and
    ``params.paths.reports_dir``; relative paths are taken from the params file's folder (the
    repository root), not from the working directory."""
    root = Path(params_path).resolve().parent
    out = []
    for given, default in ((models_dir, params.paths.models_dir), (reports_dir, params.paths.reports_dir)):
        p = Path(given if given else default)
        out.append(p if p.is_absolute() else root / p)
    return out[0], out[1]


def concept_choices(params) -> list[tuple[str, str]]:
    """(label, concept) pairs for the concept dropdown: the toy world's shapes, its personal
    subjects, then its real concepts; a concept that a threat model targets is tagged with that threat."""
    targets = {}
    for threat in THREATS:
        for c in getattr(params, threat).targets:
            targets.setdefault(c, []).append(threat)
    from .data import subjects

    concepts = list(dict.fromkeys([*subjects(params.world), *targets]))
    return [(f"{c} ({', '.join(t)} target)" if (t := targets.get(c)) else c, c) for c in concepts]


def concept_prompts(concept: str, params, n: int) -> list[str]:
    """The ``n`` prompts a concept is sampled with, as in the attack stages (a real concept's come
    from the data index at ``paths.data_dir``)."""
    from .attacks import concept_prompts as prompts
    from .data import read_index, real_prompts

    own = real_prompts(read_index(params.paths.data_dir), concept) if concept in params.world.real else ()
    return prompts(concept, params.world.colors, n, own)


def sample_seeds(params, indices: Sequence[int]) -> list[int]:
    """The sampling seed of each sample index: ``sampling.seed + i``."""
    return [params.sampling.seed + int(i) for i in indices]


# ----------------------------------------------------------------------------- discovering states


def samples_path(reports_dir: str | Path, threat: str) -> Path:
    """Where the attack stage of ``threat`` keeps its samples."""
    return Path(reports_dir) / "figures" / f"attack_{threat}" / "samples.safetensors"


def parse_sample_key(key: str) -> tuple[str, str, int, int, str]:
    """``"<attack>/<method>/seed<seed>/step<step>/<concept>"`` -> (attack, method, seed, step, concept)."""
    m = SAMPLE_KEY.match(key)
    if not m:
        raise ValueError(f"sample key {key!r} is not '<attack>/<method>/seed<seed>/step<step>/<concept>'")
    return m["attack"], m["method"], int(m["seed"]), int(m["step"]), m["concept"]


def read_attack_samples(path: str | Path, threat: str | None = None) -> dict[tuple[str, str, int], dict[str, dict[int, torch.Tensor]]]:
    """Read an attack stage's ``samples.safetensors`` into
    ``{(attack, method, step): {concept: {attack_seed: uint8 [n, 3, H, W]}}}``. Checks every key's
    format, that values are 4-d uint8 RGB tensors, and (when ``threat`` is given) that the file's
    ``threat`` metadata matches; a bad file is an error naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if threat is not None and meta.get("threat") not in (None, threat):
        raise ValueError(f"{path}: metadata says threat {meta['threat']!r}, expected {threat!r}")
    out: dict = {}
    for key, value in load_file(str(path)).items():
        try:
            attack, method, seed, step, concept = parse_sample_key(key)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if value.dtype != torch.uint8 or value.ndim != 4 or value.shape[1] != 3:
            raise ValueError(f"{path}: {key!r} is {value.dtype} {tuple(value.shape)}, expected uint8 [n, 3, H, W]")
        out.setdefault((attack, method, step), {}).setdefault(concept, {})[seed] = value
    return out


def _method_label(method: str) -> str:
    return "no immunization" if method == "none" else method


def model_states(models_dir: str | Path) -> dict[str, State]:
    """The diffusers folders under ``models_dir``: base, erased, and every
    ``immunized/<threat>/<method>`` that holds a ``model_index.json``, by label."""
    from .config import METHODS

    models_dir = Path(models_dir)
    out = {}
    for name, label in (("base", "base model"), ("erased", "erased (UCE)")):
        if (models_dir / name / "model_index.json").is_file():
            out[label] = State(label, "model", folder=models_dir / name, method="none")
    order = {m: i for i, m in enumerate(METHODS)}
    for threat in THREATS:
        root = models_dir / "immunized" / threat
        if not root.is_dir():
            continue
        folders = [p for p in root.iterdir() if (p / "model_index.json").is_file()]
        for folder in sorted(folders, key=lambda p: (order.get(p.name, len(order)), p.name)):
            label = f"immunized · {threat} · {folder.name}"
            out[label] = State(label, "model", folder=folder, threat=threat, method=folder.name)
    return out


def attacked_states(reports_dir: str | Path, threats: Sequence[str] = THREATS) -> dict[str, State]:
    """One state per (threat, attack, method, step) found in the attack stages' samples files under
    ``reports_dir``; a threat whose file is missing contributes nothing."""
    out = {}
    for threat in threats:
        path = samples_path(reports_dir, threat)
        if not path.is_file():
            continue
        samples = read_attack_samples(path, threat)
        # methods: "none" first, then by name; steps ascending
        for attack, method, step in sorted(samples, key=lambda k: (k[0], k[1] != "none", k[1], k[2])):
            label = f"attacked · {threat} · {attack} on {_method_label(method)} · step {step}"
            out[label] = State(label, "attacked", threat=threat, method=method, attack=attack, step=step, images=samples[(attack, method, step)])
    return out


def available_states(models_dir: str | Path, reports_dir: str | Path) -> dict[str, State]:
    """Every state the explorer can show, by label: the model folders under ``models_dir``, then
    the attacked states from the samples files under ``reports_dir``."""
    return {**model_states(models_dir), **attacked_states(reports_dir)}


def missing_notes(models_dir: str | Path, reports_dir: str | Path) -> list[str]:
    """One sentence per expected input that is absent (and so not offered), saying what writes it."""
    models_dir, reports_dir = Path(models_dir), Path(reports_dir)
    notes = []
    for name, stage in (("base", "data_prep"), ("erased", "erase")):
        if not (models_dir / name / "model_index.json").is_file():
            notes.append(f"no model at {models_dir / name}: run the {stage} stage")
    if not (models_dir / "judge" / "labels.json").is_file():
        notes.append(f"no judge at {models_dir / 'judge'}: images are shown without metrics (run the data_prep stage)")
    for threat in THREATS:
        if not any((p / "model_index.json").is_file() for p in (models_dir / "immunized" / threat).glob("*")):
            notes.append(f"no immunized models under {models_dir / 'immunized' / threat}: run the immunize@{threat} stage")
        path = samples_path(reports_dir, threat)
        if not path.is_file():
            notes.append(f"no attack samples at {path}: attacked states for {threat} are not offered (run the attack_{threat} stage)")
    return notes


def states_table(states: Mapping[str, State]) -> list[dict]:
    """One row per state (label, kind, threat, method, attack, step, stored concepts), for display."""
    return [{"state": s.label, "kind": s.kind, "threat": s.threat or "", "method": s.method or "", "attack": s.attack or "",
             "step": "" if s.step is None else s.step, "concepts": ", ".join(s.concepts) if s.kind == "attacked" else "any (live)"}
            for s in states.values()]


# ----------------------------------------------------------------------------- images and metrics


def get_pipeline(pipelines: dict, folder: str | Path):
    """The pipeline of a diffusers folder, loaded once and kept in ``pipelines`` (folder -> pipeline)."""
    from .models import load_pipeline

    key = str(Path(folder).resolve())
    if key not in pipelines:
        pipelines[key] = load_pipeline(folder)
    return pipelines[key]


def load_judge_or_none(models_dir: str | Path):
    """The toy world's judge from ``<models_dir>/judge``, or None when it is not there."""
    from .judge import load_judge

    folder = Path(models_dir) / "judge"
    return load_judge(folder) if (folder / "labels.json").is_file() else None


def sample_live(pipe, prompts: Sequence[str], seeds: Sequence[int], params) -> torch.Tensor:
    """Sample one image per (prompt, seed) with the attack stages' scoring settings
    (``attack.num_inference_steps`` DDIM steps, ``sampling.guidance_scale``); uint8 [N, 3, H, W]."""
    from .sampling import sample_images

    return sample_images(pipe, list(prompts), list(seeds), num_inference_steps=params.attack.num_inference_steps,
                         guidance_scale=params.sampling.guidance_scale, batch_size=params.sampling.batch_size)


def judge_metrics(judge, images: torch.Tensor, concept: str) -> dict:
    """What the judge reads in ``images``: ``presence`` of ``concept`` (share judged as it, in
    [0, 1]), the number of images, the count of each subject verdict ("other" = rejected) and the
    mean subject confidence. Without a judge: the number of images and a note."""
    from .judge import classify
    from .metrics import presence

    if judge is None:
        return {"concept": concept, "n": int(images.shape[0]), "presence": None, "note": "no judge: metrics unavailable"}
    v = classify(judge, images)
    return {
        "concept": concept,
        "n": int(images.shape[0]),
        "presence": presence(v.subject, concept),
        "verdicts": dict(Counter(v.subject).most_common()),
        "mean_confidence": float(v.subject_confidence.mean()),
    }


def state_images(state: State, concept: str, indices: Sequence[int], params, pipelines: dict | None = None) -> tuple[torch.Tensor, list[str], dict]:
    """The images of ``concept`` in ``state`` for sample indices ``indices``, their grid row labels
    and facts about them. A model state samples live (with ``pipelines`` as the cache); an
    attacked state returns its stored samples, one row per attack seed, keeping the indices the
    file has. Raises LookupError when an attacked state holds no samples of ``concept``."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no sample indices selected")
    if state.kind == "model":
        prompts = concept_prompts(concept, params, max(indices) + 1)
        prompts = [prompts[i] for i in indices]
        seeds = sample_seeds(params, indices)
        pipe = get_pipeline({} if pipelines is None else pipelines, state.folder)
        images = sample_live(pipe, prompts, seeds, params)
        return images, [], {"prompts": sorted(set(prompts)), "seeds": seeds}
    if concept not in state.images:
        stored = ", ".join(state.concepts) or "none"
        raise LookupError(f"{state.label}: no stored samples of {concept!r} (stored: {stored}); pick one of those or a model state")
    rows, labels, kept = [], [], []
    for attack_seed, stored in sorted(state.images[concept].items()):
        keep = [i for i in indices if i < stored.shape[0]]
        if not keep:
            continue
        rows.append(stored[keep])
        labels.append(f"seed {attack_seed}")
        kept = keep
    if not rows:
        n = min(t.shape[0] for t in state.images[concept].values())
        raise LookupError(f"{state.label}: only samples 0..{n - 1} of {concept!r} are stored; move the seed range down")
    facts = {"seeds": sample_seeds(params, kept), "attack_seeds": sorted(state.images[concept])}
    if len(kept) < len(indices):
        facts["note"] = f"{len(kept)} of the {len(indices)} selected samples are stored per attack seed"
    return torch.cat(rows), labels, facts


def render_state(state: State, concept: str, indices: Sequence[int], params, judge=None, pipelines: dict | None = None, scale: int = 3):
    """Render ``concept`` in ``state`` for sample indices ``indices``: returns (PIL grid image,
    metrics dict). The grid has one row per attack seed for an attacked state, else rows of up to 8;
    the metrics are :func:`judge_metrics` over all shown images plus the state, seeds and prompts
    (and per attack seed presence for an attacked state)."""
    from .viz import image_grid

    images, labels, facts = state_images(state, concept, indices, params, pipelines)
    if labels:
        grid = image_grid(images, nrow=images.shape[0] // len(labels), scale=scale, row_labels=labels)
    else:
        grid = image_grid(images, nrow=min(8, images.shape[0]), scale=scale)
    metrics = {"state": state.label, **judge_metrics(judge, images, concept), **facts}
    if labels and judge is not None and len(labels) > 1:
        per_row = images.shape[0] // len(labels)
        metrics["presence_by_attack_seed"] = {
            lab: judge_metrics(judge, images[r * per_row : (r + 1) * per_row], concept)["presence"] for r, lab in enumerate(labels)
        }
    return grid, metrics


def render_prompt(state: State, prompt: str, indices: Sequence[int], params, judge=None, pipelines: dict | None = None, concept: str | None = None, scale: int = 3):
    """Sample ``prompt`` live from the model of ``state`` at the seeds of ``indices``: returns (PIL
    grid image, metrics dict with the judge's verdicts, and the presence of ``concept`` when given).
    Attacked states keep samples, not weights, so they cannot be sampled: ValueError."""
    from .viz import image_grid

    if state.kind != "model":
        raise ValueError(f"{state.label}: attacked states keep samples, not weights; pick a model state to sample a prompt")
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("the prompt is empty")
    indices = [int(i) for i in indices]
    seeds = sample_seeds(params, indices)
    pipe = get_pipeline({} if pipelines is None else pipelines, state.folder)
    images = sample_live(pipe, [prompt] * len(seeds), seeds, params)
    grid = image_grid(images, nrow=min(8, images.shape[0]), scale=scale)
    metrics = {"state": state.label, "prompt": prompt, **judge_metrics(judge, images, concept or ""), "seeds": seeds}
    if concept is None:
        metrics.pop("presence", None)
        metrics.pop("concept", None)
    return grid, metrics


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def metrics_html(metrics: Mapping) -> str:
    """A small HTML table of a metrics dict (presence first, verdict counts as ``name: count``)."""
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, dict):
            return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
        if isinstance(value, (list, tuple)):
            if len(value) > 2 and all(isinstance(v, int) for v in value) and list(value) == list(range(value[0], value[0] + len(value))):
                return f"{value[0]}..{value[-1]}"
            return ", ".join(str(v) for v in value)
        return "n/a" if value is None else str(value)

    order = ["presence", "presence_by_attack_seed", "n", "verdicts", "mean_confidence", "concept", "state", "prompt", "prompts", "seeds", "attack_seeds", "note"]
    keys = [k for k in order if k in metrics] + [k for k in metrics if k not in order]
    rows = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th><td>{html.escape(fmt(metrics[k]))}</td></tr>" for k in keys)
    return f"<table class='mci-metrics-table'>{rows}</table>"


# ----------------------------------------------------------------------------- the widget


def explorer_ui(params, models_dir: str | Path, reports_dir: str | Path, states: Mapping[str, State] | None = None, judge="load"):
    """The explorer as an ipywidgets box: concept, model state and seed-range pickers over an image
    grid and its metrics, and a prompt box that samples the chosen model live. Loaded pipelines and
    rendered (state, concept, seeds) views are cached, so switching back is instant. Every widget
    carries a ``mci-*`` CSS class (for tests and styling). Renders the first view at once."""
    import ipywidgets as w

    torch.set_num_threads(params.threads)
    states = dict(available_states(models_dir, reports_dir) if states is None else states)
    judge = load_judge_or_none(models_dir) if judge == "load" else judge
    pipelines: dict = {}
    views: dict = {}

    concept = w.Dropdown(options=concept_choices(params), description="concept", layout=w.Layout(width="22em"))
    state = w.Dropdown(options=list(states), description="model state", layout=w.Layout(width="34em"))
    seeds = w.IntRangeSlider(value=(0, 7), min=0, max=MAX_SAMPLES - 1, description="samples", continuous_update=False,
                             layout=w.Layout(width="30em"))
    seed_help = w.HTML(f"<small>sample i is drawn from seed {params.sampling.seed} + i (the attack stages' seeds)</small>")
    image = w.Image(format="png", layout=w.Layout(min_width="120px"))
    table = w.HTML()
    status = w.HTML()
    notes = w.HTML("<br>".join(html.escape(n) for n in missing_notes(models_dir, reports_dir)))
    prompt = w.Text(placeholder="a photo of a red star", description="prompt", layout=w.Layout(width="34em"))
    go = w.Button(description="sample", button_style="primary")
    prompt_image = w.Image(format="png", layout=w.Layout(min_width="120px", display="none"))
    prompt_table = w.HTML()
    for widget, name in ((concept, "concept"), (state, "state"), (seeds, "seeds"), (image, "image"), (table, "metrics"),
                         (status, "status"), (notes, "notes"), (prompt, "prompt"), (go, "sample"),
                         (prompt_image, "prompt-image"), (prompt_table, "prompt-metrics")):
        widget.add_class(f"mci-{name}")

    def indices():
        lo, hi = seeds.value
        return list(range(lo, hi + 1))

    def show(_=None):
        if state.value is None:
            status.value = "no model states found: see the notes below"
            return
        key = (state.value, concept.value, seeds.value)
        status.value = "rendering ..."
        try:
            if key not in views:
                grid, metrics = render_state(states[state.value], concept.value, indices(), params, judge, pipelines)
                views[key] = (png_bytes(grid), metrics_html(metrics))
        except (LookupError, ValueError) as err:
            image.value, table.value, status.value = b"", "", f"<span style='color:#a00'>{html.escape(str(err))}</span>"
            image.layout.display = "none"  # no broken-image icon
            return
        image.value, table.value = views[key]
        image.layout.display = None
        status.value = f"{html.escape(state.value)} · {html.escape(concept.value)}"

    def sample(_=None):
        go.disabled = True
        try:
            grid, metrics = render_prompt(states[state.value], prompt.value, indices(), params, judge, pipelines, concept.value)
            prompt_image.value, prompt_table.value = png_bytes(grid), metrics_html(metrics)
            prompt_image.layout.display = None
        except (LookupError, ValueError, KeyError) as err:
            prompt_image.value, prompt_table.value = b"", f"<span style='color:#a00'>{html.escape(str(err))}</span>"
            prompt_image.layout.display = "none"
        finally:
            go.disabled = False

    for widget in (concept, state, seeds):
        widget.observe(show, names="value")
    go.on_click(sample)
    show()
    box = w.VBox([
        w.HBox([concept, state]),
        w.HBox([seeds, seed_help]),
        status,
        w.HBox([image, table]),
        w.HTML("<b>Sample a prompt live</b> (model states only)"),
        w.HBox([prompt, go]),
        w.HBox([prompt_image, prompt_table]),
        notes,
    ])
    box.add_class("mci-explorer")
    return box
