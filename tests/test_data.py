import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mci_lib import data
from mci_lib.config import WorldConfig


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_toy_world_is_deterministic_for_a_seed(tmp_path, micro_params):
    w = micro_params.world
    a = data.write_toy_world(w, 3, tmp_path / "a", progress=False)
    b = data.write_toy_world(w, 3, tmp_path / "b", progress=False)
    c = data.write_toy_world(w, 4, tmp_path / "c", progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_splits_are_disjoint_and_listed(micro_world, micro_params):
    records = data.read_index(micro_world)
    files = [r.file for r in records]
    assert len(files) == len(set(files))
    by_split = {s: {r.file for r in data.select(records, s)} for s in data.SPLITS}
    for s in data.SPLITS:
        listed = set((micro_world / "splits" / f"{s}.txt").read_text().split())
        assert listed == by_split[s]
        for t in data.SPLITS:
            if s < t:
                assert not by_split[s] & by_split[t]
    # no image is repeated across splits either (content, not only names)
    digests = {}
    for r in records:
        d = hashlib.sha256((micro_world / r.file).read_bytes()).hexdigest()
        assert d not in digests, f"{r.file} duplicates {digests.get(d)}"
        digests[d] = r.file


def test_personal_subjects_never_in_pretraining(micro_world, micro_params):
    records = data.read_index(micro_world)
    pre = data.select(records, "pretrain")
    assert {r.subject for r in pre} == set(micro_params.world.shapes)
    for p in micro_params.world.personal:
        assert data.select(records, "attack", p), f"{p} has attack images"
        assert all(data.PERSONAL_SUBJECTS[p]["token"] in r.caption for r in data.select(records, subject=p))
    meta = json.loads((micro_world / "world.json").read_text())
    assert meta["personal"]["p1"]["class_word"] == "badge"


def record_paint(monkeypatch) -> list:
    """A list that gets (shape, color, cx, cy) of every shape data._styled_shape paints."""
    painted = []
    real_paint = data._styled_shape
    monkeypatch.setattr(data, "_styled_shape", lambda canvas, shape, color, style, cx, cy, *rest: painted.append((shape, color, cx, cy)) or real_paint(canvas, shape, color, style, cx, cy, *rest))
    return painted


def test_codec_images_are_seeded_and_never_draw_a_personal_design(monkeypatch):
    world = WorldConfig(shapes=("circle", "star", "square", "cross"), codec_images=6)
    a, b, c = data.codec_images(world, 0), data.codec_images(world, 0), data.codec_images(world, 1)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    # record what draw_codec paints: nested pairs share a centre; the personal nestings never occur
    painted = record_paint(monkeypatch)
    rng = np.random.default_rng(0)
    nested = set()
    for _ in range(400):
        painted.clear()
        data.draw_codec(rng, world)
        (outer, c1, x1, y1), (inner, c2, x2, y2) = painted
        assert c1 != c2, "the two shapes share a color"
        if (x1, y1) == (x2, y2):
            nested.add((outer, inner))
    assert len(nested) >= 8  # every other ordered pair shows up
    assert not nested & set(data.PERSONAL_LAYOUTS.values())


def test_composites_are_seeded_captioned_by_both_parts_and_never_a_personal_design(monkeypatch):
    world = WorldConfig(shapes=("circle", "star", "square", "cross"), pretrain_composites=5)
    (a, ra), (b, rb), (c, _) = data.composite_images(world, 0), data.composite_images(world, 0), data.composite_images(world, 1)
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and ra == rb and not torch.equal(a, c)
    assert all(r.split == "pretrain" and r.subject == "composite" and data.fresh_caption(np.random.default_rng(0), r) == r.caption for r in ra)
    # what draw_composite paints: two shapes on one centre, in two colors, each named in the caption
    painted = record_paint(monkeypatch)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        painted.clear()
        _, caption = data.draw_composite(rng, world)
        (outer, c1, x1, y1), (inner, c2, x2, y2) = painted
        assert (x1, y1) == (x2, y2) and outer != inner and c1 != c2
        assert f"{inner} inside a" in caption or f"{inner} on a" in caption
        assert caption.endswith(outer) or f"{outer}," in caption
        if not caption.startswith("a photo"):  # the colored templates name each part's own color
            assert f"a {c2} {inner} " in caption and f"a {c1} {outer}" in caption
        seen.add((outer, inner))
    assert len(seen) == 4 * 3 - 2 and not seen & set(data.PERSONAL_LAYOUTS.values())
    assert data.composite_images(WorldConfig(), 0)[0].shape[0] == 0  # off by default
    # image i is the drawing captioned by record i, from the composites' own stream
    monkeypatch.undo()
    rng = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(4343,)))
    first, caption = data.draw_composite(rng, world)
    assert torch.equal(a[0], torch.from_numpy(first).permute(2, 0, 1)) and ra[0].caption == caption
    with pytest.raises(ValueError, match="world.pretrain_composites"):
        data.composite_images(WorldConfig(shapes=("circle",), pretrain_composites=1), 0)


def test_images_are_32px_rgb_and_captions_name_the_concept(micro_world):
    records = data.read_index(micro_world)
    images = data.load_images(micro_world, records[:10])
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    for r in data.select(records, "pretrain"):
        assert r.subject in r.caption


def test_unknown_color_is_refused():
    with pytest.raises(ValueError, match="world.colors"):
        list(data.generate_records(WorldConfig(colors=("red", "teal")), 0))


def test_reads_wikiart_relearn(wikiart):
    concept = data.read_concept_folder(wikiart / "Van_Gogh", size=32)
    assert concept.images.shape == (20, 3, 32, 32)
    assert set(concept.prompts) == {"An artwork by Van Gogh."}
    assert any("!" in f for f in concept.files)  # messy names survive
    monet = data.read_concept_folder(wikiart / "Claude_Monet", size=32)
    assert monet.images.shape[0] == 20
    assert not torch.equal(concept.images[0], monet.images[0])


def _copy_folder(src, dst, n=3):
    dst.mkdir()
    rows = (src / "metadata.csv").read_text().splitlines()
    keep = rows[1 : n + 1]
    for row in keep:
        name = row.split(",")[0]
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "metadata.csv").write_text("\n".join([rows[0], *keep]) + "\n")
    return [r.split(",")[0] for r in keep]


def test_missing_image_error_names_the_file(wikiart, tmp_path):
    names = _copy_folder(wikiart / "Van_Gogh", tmp_path / "vg")
    (tmp_path / "vg" / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match=names[1].replace("(", r"\(").replace(")", r"\)")):
        data.read_concept_folder(tmp_path / "vg", size=32)


def test_corrupt_and_truncated_images_error_names_the_file(wikiart, tmp_path):
    names = _copy_folder(wikiart / "Van_Gogh", tmp_path / "vg")
    target = tmp_path / "vg" / names[0]
    target.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="cannot read this image") as err:
        data.read_concept_folder(tmp_path / "vg", size=32)
    assert names[0] in str(err.value)
    raw = (wikiart / "Van_Gogh" / names[0]).read_bytes()
    target.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="cannot read this image"):
        data.read_concept_folder(tmp_path / "vg", size=32)


def test_grayscale_and_rgba_are_converted(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    Image.fromarray(np.full((40, 50), 90, np.uint8), "L").save(folder / "gray.png")
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    (folder / "metadata.csv").write_text("file_name,prompt\ngray.png,a gray thing\nrgba.png,a red thing\n")
    c = data.read_concept_folder(folder, size=16)
    assert c.images.shape == (2, 3, 16, 16)
    assert c.images[0].float().std(0).max() == 0  # gray: equal channels
    assert c.images[1, 0].min() == 255 and c.images[1, 1].max() == 0


def test_concept_list_json(wikiart, tmp_path):
    spec = [
        {"instance_prompt": "An artwork by Van Gogh.", "class_prompt": "An artwork.", "instance_data_dir": str(wikiart / "Van_Gogh"), "class_data_dir": "class/art"},
        {"instance_prompt": "An artwork by Claude Monet.", "class_prompt": "An artwork.", "instance_data_dir": str(wikiart / "Claude_Monet"), "class_data_dir": "class/art"},
    ]
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(spec))
    concepts = data.read_concept_list(path, size=32)
    assert [c.images.shape[0] for c in concepts] == [20, 20]
    assert concepts[1].class_prompt == "An artwork." and concepts[1].class_folder == tmp_path / "class/art"
    spec[1]["instance_data_dir"] = spec[0]["instance_data_dir"]
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="repeats instance_data_dir"):
        data.read_concept_list(path, size=32)
    path.write_text(json.dumps([{"instance_prompt": "x"}]))
    with pytest.raises(ValueError, match="lacks instance_data_dir"):
        data.read_concept_list(path, size=32)
    path.write_text("[]")
    with pytest.raises(ValueError, match="non-empty"):
        data.read_concept_list(path, size=32)
