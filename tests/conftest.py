"""Shared fixtures: offline guards, micro params, a micro toy world and a micro pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).parent / "netguard"

# Offline always: no hub access, and outbound connections refused here and in subprocesses.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
sys.path.insert(0, str(NETGUARD))
import sitecustomize  # noqa: E402,F401  (installs the guard in this process)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 cores; OMP_NUM_THREADS=1 when sharing them

SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
CLIP_VOCAB = ROOT / ".cache" / "clip" / "bpe_simple_vocab_16e6.txt.gz"

# Everything small enough that a model trains for a few steps in well under a second.
MICRO = {
    "threads": 1,  # micro models gain nothing from more threads, and tests may share the cores
    "world.pretrain_per_shape": 6,
    "world.defense_per_subject": 2,
    "world.attack_per_subject": 2,
    "world.reference_per_subject": 2,
    "world.judge_train_per_subject": 6,
    "world.judge_test_per_subject": 3,
    "world.codec_images": 6,
    "world.pretrain_composites": 6,
    "model.unet_channels": [16, 32],
    "model.attention_head_dim": 2,
    "model.cross_attention_dim": 16,
    "model.text_hidden_size": 16,
    "model.text_layers": 1,
    "model.text_heads": 2,
    "model.text_intermediate_size": 32,
    "model.vae_channels": [8, 16, 16],
    "pretrain.vae_steps": 2,
    "pretrain.vae_batch_size": 8,
    "pretrain.unet_steps": 2,
    "pretrain.unet_batch_size": 4,
    "pretrain.unet_warmup_steps": 1,
    "judge.steps": 2,
    "judge.batch_size": 8,
    "sampling.samples_per_concept": 2,
    "sampling.num_inference_steps": 2,
    "sampling.batch_size": 4,
    "immunize.steps": 2,
    "immunize.batch_size": 2,
    "immunize.reg_captions": 4,
    "immunize.eval_batches": 1,
    "attack.steps": 2,
    "attack.checkpoints": [1, 2],
    "attack.seeds": [0],
    "attack.batch_size": 2,
    "attack.class_images": 2,
    "attack.utility_samples": 2,
    "attack.sweep_attacks": ["lora", "dreambooth_lora"],  # the default runs no sweep; the tests still cover it
    "attack.sweep_lr_scales": [2.0],
    "scaling.counts": [1, 2],
    "attack.sweep_lora_ranks": [2],
}


@pytest.fixture(scope="session")
def clip_vocab() -> Path:
    if not CLIP_VOCAB.is_file():
        pytest.fail(f"{CLIP_VOCAB} is missing: run `make setup` first")
    return CLIP_VOCAB


@pytest.fixture(scope="session")
def micro_params(clip_vocab):
    from mci_lib.config import load_params

    return load_params(ROOT / "params.yaml", overrides={**MICRO, "paths.clip_vocab": str(clip_vocab)})


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory, micro_params):
    from mci_lib import data

    out = tmp_path_factory.mktemp("toy") / "toy"
    data.write_toy_world(micro_params.world, micro_params.seed, out, progress=False)
    return out


@pytest.fixture()
def micro_pipe(micro_params):
    from mci_lib import models

    return models.build_tiny_pipeline(micro_params.model, micro_params.paths.clip_vocab, micro_params.world.image_size, seed=0)


@pytest.fixture(scope="session")
def released_micro(tmp_path_factory, micro_params) -> Path:
    """The micro model saved as a diffusers folder, as a publisher releases it (attacks load it)."""
    from mci_lib import models

    folder = tmp_path_factory.mktemp("released") / "model"
    models.save_pipeline(models.build_tiny_pipeline(micro_params.model, micro_params.paths.clip_vocab, micro_params.world.image_size, seed=0), folder)
    return folder


@pytest.fixture(scope="session")
def wikiart() -> Path:
    path = SHARED_DATASETS / "wikiart_relearn"
    if not path.is_dir():
        pytest.skip(f"{path} not present (it sits beside the repository in CI)")
    return path
