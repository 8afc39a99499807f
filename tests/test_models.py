import pytest
import torch
from diffusers import StableDiffusionPipeline

from mci_lib import models


def test_tokenizer_gives_real_clip_ids(clip_vocab):
    tok = models.build_clip_tokenizer(clip_vocab)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_missing_vocab_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="make setup"):
        models.build_clip_tokenizer(tmp_path / "nope.txt.gz")


def test_tiny_pipeline_has_sd_architecture(micro_pipe, micro_params):
    unet = micro_pipe.unet
    assert unet.config.cross_attention_dim == micro_params.model.cross_attention_dim
    assert len(models.cross_attention_projections(unet)) > 0
    assert micro_pipe.vae.config.latent_channels == 4
    assert micro_pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_round_trip_through_save_and_load(tmp_path, micro_pipe):
    folder = models.save_pipeline(micro_pipe, tmp_path / "m")
    loaded = models.load_pipeline(folder)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(micro_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer("a red star").input_ids == micro_pipe.tokenizer("a red star").input_ids
    assert not list(tmp_path.glob(".m.tmp-*"))  # no temporary folder left behind


def test_stock_diffusers_loads_the_saved_folder(tmp_path, micro_pipe):
    folder = models.save_pipeline(micro_pipe, tmp_path / "m")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pipe("a red star", num_inference_steps=2, guidance_scale=2.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


def test_placeholder_tokens_survive_save_and_load(tmp_path, micro_pipe):
    ids = models.add_placeholder_tokens(micro_pipe, ["<p1>"], init_word="badge")
    assert ids == [49408]
    emb = micro_pipe.text_encoder.get_input_embeddings().weight
    badge = micro_pipe.tokenizer("badge", add_special_tokens=False).input_ids[0]
    assert torch.equal(emb[49408], emb[badge])
    assert micro_pipe.tokenizer("a photo of <p1> badge").input_ids[4] == 49408
    with pytest.raises(ValueError, match="already"):
        models.add_placeholder_tokens(micro_pipe, ["<p1>"])
    loaded = models.load_pipeline(models.save_pipeline(micro_pipe, tmp_path / "m"))
    assert loaded.tokenizer("a photo of <p1> badge").input_ids[4] == 49408
    assert loaded.text_encoder.get_input_embeddings().weight.shape[0] == 49409


def test_not_a_model_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        models.load_pipeline(tmp_path)


def test_attention_processors_compute_the_same_unet(tmp_path, micro_pipe):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = micro_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, unet.config.sample_size, unet.config.sample_size, generator=g)
    text = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500, 990])
    outputs = {}
    for kind, cls in (("classic", AttnProcessor), ("sdpa", AttnProcessor2_0)):
        assert models.set_attention(unet, kind) == kind
        assert {type(p) for p in unet.attn_processors.values()} == {cls}
        with torch.no_grad():
            outputs[kind] = unet(x, t, text).sample
    assert torch.allclose(outputs["classic"], outputs["sdpa"], atol=1e-5)
    assert not torch.equal(outputs["classic"], torch.zeros_like(outputs["classic"]))
    assert models.set_attention(unet) == "classic"  # auto, on the CPU
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        models.set_attention(unet, "flash")
    # the loader picks the processor; what it saves is the stock folder, loaded with diffusers' default
    loaded = models.load_pipeline(models.save_pipeline(micro_pipe, tmp_path / "m"))
    assert {type(p) for p in loaded.unet.attn_processors.values()} == {AttnProcessor}
    assert {type(p) for p in models.load_pipeline(tmp_path / "m", attention="sdpa").unet.attn_processors.values()} == {AttnProcessor2_0}
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert {type(p) for p in stock.unet.attn_processors.values()} == {AttnProcessor2_0}
