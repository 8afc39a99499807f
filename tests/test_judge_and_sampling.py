import numpy as np
import pytest
import torch

from mci_lib import data, judge, metrics, sampling


def test_sampling_is_fixed_by_seed_and_batch_independent(micro_pipe):
    prompts = ["a photo of a red star", "a photo of a blue circle", "a cross", "a heart"]
    a = sampling.sample_images(micro_pipe, prompts, [5, 6, 7, 8], num_inference_steps=3, guidance_scale=3.0, batch_size=4)
    b = sampling.sample_images(micro_pipe, prompts, [5, 6, 7, 8], num_inference_steps=3, guidance_scale=3.0, batch_size=1)
    c = sampling.sample_images(micro_pipe, prompts, [9, 6, 7, 8], num_inference_steps=3, guidance_scale=3.0, batch_size=4)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1  # same noise per seed whatever the batch
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1:], c[1:])


def test_judge_learns_the_toy_world_and_rejects_noise(micro_params):
    """A judge trained for a few hundred steps on a small drawn set recognises held-out shapes."""
    from dataclasses import replace

    world = replace(micro_params.world, shapes=("circle", "square", "star"), personal=("p1",))
    rng = np.random.default_rng(0)
    subs, imgs, cols, stys = [], [], [], []
    for s in data.subjects(world):
        for _ in range(60):
            c = world.colors[rng.integers(6)] if s in world.shapes else ""
            y = world.styles[rng.integers(4)] if s in world.shapes else ""
            imgs.append(data.draw_concept(rng, s, c or "red", y or "solid"))
            subs.append(s), cols.append(c), stys.append(y)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    test = np.arange(len(subs)) % 5 == 0
    train = ~test
    cfg = replace(micro_params.judge, steps=250, batch_size=48)
    j, losses = judge.train_judge(x[train], [s for s, t in zip(subs, train) if t], [c for c, t in zip(cols, train) if t], [y for y, t in zip(stys, train) if t], world, cfg, seed=0, progress=False)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    report = judge.judge_report(j, x[test], [s for s, t in zip(subs, test) if t], world, seed=0, n_noise=60)
    assert report["judge_test_accuracy"] >= 0.8
    assert report["judge_reject_rate_on_noise"] >= 0.8


def test_judge_round_trips_and_reject_threshold_applies(tmp_path, micro_params):
    world = micro_params.world
    j, _ = judge.train_judge(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), ["circle"] * 4, ["red"] * 4, ["solid"] * 4, world, micro_params.judge, seed=0, progress=False)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    loaded = judge.load_judge(judge.save_judge(j, tmp_path / "j"))
    a, b = judge.classify(j, x), judge.classify(loaded, x)
    assert a.subject == b.subject and torch.allclose(a.features, b.features)
    from dataclasses import replace

    j.labels = replace(j.labels, reject_threshold=1.01)  # nothing is ever confident enough
    assert set(judge.classify(j, x).subject) == {judge.OTHER}


def test_judge_file_that_is_not_safetensors_is_refused(tmp_path, micro_params):
    j, _ = judge.train_judge(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["circle"] * 2, ["red"] * 2, ["solid"] * 2, micro_params.world, micro_params.judge, seed=0, progress=False)
    folder = judge.save_judge(j, tmp_path / "j")
    (folder / "judge.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not a safetensors file"):
        judge.load_judge(folder)


def test_presence_and_similarity_metrics():
    assert metrics.presence(["star", "other", "star", "circle"], "star") == 0.5
    assert metrics.attribute_accuracy(["red", "blue"], ["red", "red"]) == 0.5
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.mean_cosine_similarity(f, f[:1]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.presence([], "star")
