"""The concept explorer (mci_lib.widgets, notebooks/concept_explorer.ipynb) on a tiny tree of
models, a judge and an attack samples file made here, headless and in a browser through Voila."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from mci_lib import widgets

LIVE = {"attack.num_inference_steps": 2, "sampling.batch_size": 8}  # overrides: quick live sampling


def _samples(threat="relearn", n=6, size=32):
    """A samples file's tensors: 2 attacks x (none, mima) x 2 attack seeds x steps (0, 2) x 2 targets."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for attack in ("full", "lora"):
        for method in ("none", "mima"):
            for seed in (0, 1):
                for step in (0, 2):
                    for concept in ("star", "heart"):
                        out[f"{attack}/{method}/seed{seed}/step{step}/{concept}"] = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory, micro_params):
    """models/{base, erased, immunized/relearn/mima, immunized/personalize/imma_joint, judge} and
    reports/figures/attack_relearn/samples.safetensors (no personalize samples)."""
    from mci_lib import judge, models

    root = tmp_path_factory.mktemp("explorer")
    m, r = root / "models", root / "reports"
    cfg = micro_params.model
    for seed, rel in enumerate(("base", "erased", "immunized/relearn/mima", "immunized/personalize/imma_joint")):
        pipe = models.build_tiny_pipeline(cfg, micro_params.paths.clip_vocab, micro_params.world.image_size, seed=seed)
        models.save_pipeline(pipe, m / rel)
    w = micro_params.world
    torch.manual_seed(0)
    labels = judge.JudgeLabels((*w.shapes, *w.personal, judge.OTHER), w.colors, w.styles, micro_params.judge.feature_dim, 0.0)
    judge.save_judge(judge.Judge(labels).eval(), m / "judge")
    path = widgets.samples_path(r, "relearn")
    path.parent.mkdir(parents=True)
    save_file(_samples(), str(path), metadata={"threat": "relearn"})
    return root


@pytest.fixture(scope="module")
def live_params(micro_params):
    import dataclasses

    return dataclasses.replace(micro_params, attack=dataclasses.replace(micro_params.attack, num_inference_steps=2))


def test_states_are_discovered_from_the_tree(tree):
    states = widgets.available_states(tree / "models", tree / "reports")
    models = [s for s in states.values() if s.kind == "model"]
    assert [s.label for s in models] == ["base model", "erased (UCE)", "immunized · relearn · mima", "immunized · personalize · imma_joint"]
    assert models[2].folder == tree / "models" / "immunized" / "relearn" / "mima"
    attacked = [s for s in states.values() if s.kind == "attacked"]
    assert len(attacked) == 2 * 2 * 2  # attack x method x step; attack seeds are rows within a state
    first = attacked[0]
    assert (first.threat, first.attack, first.method, first.step) == ("relearn", "full", "none", 0)
    assert first.label == "attacked · relearn · full on no immunization · step 0"
    assert first.concepts == ["heart", "star"] and sorted(first.images["star"]) == [0, 1]
    assert {s.threat for s in attacked} == {"relearn"}
    notes = widgets.missing_notes(tree / "models", tree / "reports")
    assert len(notes) == 1 and "attack_personalize" in notes[0] and "not offered" in notes[0]
    rows = widgets.states_table(states)
    assert len(rows) == len(states) and rows[-1]["concepts"] == "heart, star"


def test_missing_folders_offer_nothing_and_say_why(tmp_path):
    assert widgets.available_states(tmp_path / "models", tmp_path / "reports") == {}
    notes = "\n".join(widgets.missing_notes(tmp_path / "models", tmp_path / "reports"))
    for part in ("base", "erased", "judge", "immunized", "attack_relearn", "attack_personalize"):
        assert part in notes
    assert widgets.load_judge_or_none(tmp_path / "models") is None


def test_bad_samples_files_are_named(tmp_path):
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    bad_key = tmp_path / "a.safetensors"
    save_file({"full/none/step0/star": img}, str(bad_key))
    with pytest.raises(ValueError, match=r"a\.safetensors.*seed<seed>"):
        widgets.read_attack_samples(bad_key)
    bad_dtype = tmp_path / "b.safetensors"
    save_file({"full/none/seed0/step0/star": img.float()}, str(bad_dtype))
    with pytest.raises(ValueError, match=r"b\.safetensors.*uint8"):
        widgets.read_attack_samples(bad_dtype)
    wrong_threat = tmp_path / "c.safetensors"
    save_file({"full/none/seed0/step0/star": img}, str(wrong_threat), metadata={"threat": "personalize"})
    with pytest.raises(ValueError, match="expected 'relearn'"):
        widgets.read_attack_samples(wrong_threat, "relearn")
    assert widgets.parse_sample_key("dreambooth_lora/imma_joint/seed1/step300/p1") == ("dreambooth_lora", "imma_joint", 1, 300, "p1")


def test_concepts_paths_and_seeds(tmp_path, micro_params):
    choices = widgets.concept_choices(micro_params)
    assert [c for _, c in choices] == [*micro_params.world.shapes, *micro_params.world.personal]
    assert ("star (relearn target)", "star") in choices and ("p1 (personalize target)", "p1") in choices
    assert widgets.sample_seeds(micro_params, [0, 3]) == [micro_params.sampling.seed, micro_params.sampling.seed + 3]
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "notebooks").mkdir()
    found = widgets.find_params_file("params.yaml", tmp_path / "notebooks")
    assert found == (tmp_path / "params.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        widgets.find_params_file("nope.yaml", tmp_path)
    models_dir, reports_dir = widgets.resolve_dirs(found, micro_params)
    assert models_dir == tmp_path / micro_params.paths.models_dir and reports_dir == tmp_path / micro_params.paths.reports_dir
    assert widgets.resolve_dirs(found, micro_params, "/x/m", "r") == (Path("/x/m"), tmp_path / "r")


def test_render_model_state_samples_live_and_judges(tree, live_params):
    from mci_lib.judge import load_judge

    states = widgets.available_states(tree / "models", tree / "reports")
    judge = load_judge(tree / "models" / "judge")
    pipelines = {}
    image, metrics = widgets.render_state(states["base model"], "star", range(4), live_params, judge, pipelines, scale=2)
    assert image.size == (4 * 65 + 1, 65 + 1)  # 4 tiles of 32 px x2 plus 1 px padding
    assert 0.0 <= metrics["presence"] <= 1.0 and metrics["n"] == 4 and sum(metrics["verdicts"].values()) == 4
    assert metrics["seeds"] == widgets.sample_seeds(live_params, range(4)) and metrics["prompts"]
    assert len(pipelines) == 1
    pipe = next(iter(pipelines.values()))
    again, _ = widgets.render_state(states["base model"], "star", range(4), live_params, judge, pipelines, scale=2)
    assert next(iter(pipelines.values())) is pipe  # cached, not reloaded
    assert again.tobytes() == image.tobytes()  # same seeds, same images
    other, _ = widgets.render_state(states["base model"], "p1", range(4), live_params, judge, pipelines, scale=2)
    assert other.tobytes() != image.tobytes()
    html = widgets.metrics_html(metrics)
    assert "presence" in html and "<table" in html


def test_render_attacked_state_reads_stored_samples(tree, live_params):
    from mci_lib.judge import load_judge

    states = widgets.available_states(tree / "models", tree / "reports")
    state = states["attacked · relearn · lora on mima · step 2"]
    judge = load_judge(tree / "models" / "judge")
    image, metrics = widgets.render_state(state, "heart", range(0, 4), live_params, judge, scale=1)
    assert metrics["n"] == 2 * 4 and 0.0 <= metrics["presence"] <= 1.0
    assert set(metrics["presence_by_attack_seed"]) == {"seed 0", "seed 1"} and metrics["attack_seeds"] == [0, 1]
    assert image.size[1] == 2 * 33 + 1  # one row per attack seed
    _, clipped = widgets.render_state(state, "heart", range(4, 10), live_params, judge)
    assert clipped["n"] == 2 * 2 and "2 of the 6" in clipped["note"]  # 6 samples stored per seed
    with pytest.raises(LookupError, match="no stored samples of 'circle'"):
        widgets.render_state(state, "circle", range(4), live_params, judge)
    with pytest.raises(LookupError, match="only samples 0..5"):
        widgets.render_state(state, "heart", range(20, 30), live_params, judge)
    _, blind = widgets.render_state(state, "heart", range(2), live_params, judge=None)
    assert blind["presence"] is None and "no judge" in blind["note"]


def test_render_prompt_samples_the_chosen_model(tree, live_params):
    from mci_lib.judge import load_judge

    states = widgets.available_states(tree / "models", tree / "reports")
    judge = load_judge(tree / "models" / "judge")
    image, metrics = widgets.render_prompt(states["erased (UCE)"], "a photo of a blue heart", range(3), live_params, judge, concept="heart", scale=1)
    assert image.size == (3 * 33 + 1, 33 + 1) and metrics["prompt"] == "a photo of a blue heart" and 0.0 <= metrics["presence"] <= 1.0
    _, plain = widgets.render_prompt(states["erased (UCE)"], "a square", range(2), live_params, judge)
    assert "presence" not in plain and sum(plain["verdicts"].values()) == 2
    with pytest.raises(ValueError, match="keep samples, not weights"):
        widgets.render_prompt(states["attacked · relearn · full on mima · step 2"], "a star", range(2), live_params, judge)
    with pytest.raises(ValueError, match="empty"):
        widgets.render_prompt(states["erased (UCE)"], "  ", range(2), live_params, judge)


def test_explorer_ui_renders_and_switches(tree, live_params):
    ui = widgets.explorer_ui(live_params, tree / "models", tree / "reports")
    found = {}

    def walk(widget):
        for c in getattr(widget, "_dom_classes", ()):
            if c.startswith("mci-"):
                found[c] = widget
        for child in getattr(widget, "children", ()):
            walk(child)

    walk(ui)
    image, state, concept, status = found["mci-image"], found["mci-state"], found["mci-concept"], found["mci-status"]
    first = bytes(image.value)
    assert first.startswith(b"\x89PNG") and "presence" in found["mci-metrics"].value
    concept.value = "star"
    star = bytes(image.value)
    assert star != first and star.startswith(b"\x89PNG")
    state.value = "attacked · relearn · full on mima · step 2"
    assert bytes(image.value) not in (first, star) and bytes(image.value).startswith(b"\x89PNG")
    concept.value = "circle"  # not attacked: a message, no image
    assert bytes(image.value) == b"" and "no stored samples" in status.value
    state.value = "base model"
    concept.value = "star"
    assert bytes(image.value) == star  # the cached view
    found["mci-prompt"].value = "a photo of a red circle"
    found["mci-sample"].click()
    assert bytes(found["mci-prompt-image"].value).startswith(b"\x89PNG")
    assert "attack_personalize" in found["mci-notes"].value


@pytest.mark.slow
def test_notebook_runs_headless_under_papermill(tree, tmp_path):
    import papermill as pm

    out = tmp_path / "concept_explorer.ipynb"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "concept_explorer.ipynb"),
        str(out),
        parameters={"params_file": str(ROOT / "params.yaml"), "overrides": LIVE,
                    "models_dir": str(tree / "models"), "reports_dir": str(tree / "reports")},
        cwd=str(ROOT / "notebooks"),  # where Voila and JupyterLab run it
        kernel_name="python3",
        progress_bar=False,
    )
    text = out.read_text()
    assert "attacked · relearn · lora on mima · step 2" in text  # the states table
    assert "application/vnd.jupyter.widget-view+json" in text  # the explorer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_voila_serves_the_explorer_in_a_browser(tree, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "MCI_PARAMS_FILE": str(ROOT / "params.yaml"), "MCI_OVERRIDES": json.dumps(LIVE),
           "MCI_MODELS_DIR": str(tree / "models"), "MCI_REPORTS_DIR": str(tree / "reports")}
    voila = Path(sys.executable).with_name("voila")
    log = (tmp_path / "voila.log").open("w")
    proc = subprocess.Popen([str(voila), str(ROOT / "notebooks" / "concept_explorer.ipynb"), "--no-browser", f"--port={port}",
                             "--Voila.ip=127.0.0.1", "--show_tracebacks=True"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    screenshot = Path(os.environ.get("MCI_SCREENSHOT") or tmp_path / "concept_explorer.png")
    src = "() => { const i = document.querySelector('img.mci-image'); return i ? i.getAttribute('src') || '' : null; }"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"voila exited: {(tmp_path / 'voila.log').read_text()[-2000:]}")
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url, timeout=120_000)
            page.wait_for_function(f"() => ({src})()", timeout=240_000)  # the first view rendered
            first = page.evaluate(src)
            assert first.startswith(("blob:", "data:"))
            page.select_option(".mci-concept select", label="heart (relearn target)")
            page.wait_for_function(f"() => {{ const s = ({src})(); return s && s !== {json.dumps(first)}; }}", timeout=120_000)
            second = page.evaluate(src)
            page.select_option(".mci-state select", label="attacked · relearn · full on mima · step 2")
            page.wait_for_function(f"() => {{ const s = ({src})(); return s && s !== {json.dumps(second)}; }}", timeout=120_000)
            assert "presence" in page.inner_text(".mci-metrics")
            assert "attack_personalize" in page.inner_text(".mci-notes")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".mci-explorer").screenshot(path=str(screenshot))
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert screenshot.stat().st_size > 1000
