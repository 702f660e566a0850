"""Text-conditional latent models in Stable Diffusion's layout (issue 23, build item 4): a pipeline directory with a
UNet2DConditionModel, a CLIP text encoder and tokenizer, an AutoencoderKL and its scheduler goes from `tdcdiff run
--base DIR --data <captioned folder>` to a bundle whose pipeline takes prompts; captions come from metadata.jsonl;
their embeddings are computed once and cached; classifier-free guidance uses the empty prompt; cross-attention
loses whole heads and never its text width; a bundle's text encoder and tokenizer are untrusted input."""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from text_pipeline import TEXT_WIDTH, captioned_folder, clip_vocabulary, text_pipeline, write_tokenizer_files

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
SHAPE = (4, 8, 8)  # the tiny pipeline's latents


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return text_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def loaded(pipeline_dir):
    from tdcdiff.base_model import load_base_model

    return load_base_model(str(pipeline_dir))


def _unet(**changes):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    settings = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH,
                    attention_head_dim=4, norm_num_groups=8)
    return UNet2DConditionModel(**{**settings, **changes}).eval()


# -- captions ---------------------------------------------------------------------------------------------------
def test_captions_come_from_metadata_jsonl_in_a_folder_or_a_zip(tmp_path):
    from tdcdiff.data import load_dataset

    folder = captioned_folder(tmp_path / "data")
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    wanted = {line["file_name"]: line["text"] for line in lines}
    data = load_dataset(str(folder))
    order = sorted(wanted)  # images are read in path order, labels from their class folders
    assert data.captions == [wanted[name] for name in order] and data.num_classes == 2
    assert data.describe()["captions_sha256"] == hashlib.sha256(json.dumps(data.captions).encode()).hexdigest()
    # A limit subset keeps each image's own caption: red images (class 1) are the squares.
    subset = load_dataset(str(folder), limit=7, seed=3)
    assert len(subset.captions) == 7
    assert all(("red square" in c) == (label == 1) for c, label in zip(subset.captions, subset.labels.tolist()))
    # The same folder zipped (its single top folder is the root) gives the same captions.
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"data/{path.relative_to(folder).as_posix()}")
    zipped = load_dataset(str(archive))
    assert zipped.captions == data.captions and torch.equal(zipped.labels, data.labels)
    digits = load_dataset("digits", limit=4)
    assert digits.captions is None and "captions_sha256" not in digits.describe()


@pytest.mark.parametrize("metadata, message", [
    ('{"file_name": "red/000.png"}\n', r"metadata.jsonl in folder .* line 1 is not a JSON object with a string "
                                       r"\"file_name\" and a string \"text\" \(the caption\); write one such object"),
    ("not json\n", r"line 1 is not a JSON object"),
    ('{"file_name": "../x.png", "text": "a"}\n', r"line 1 names '../x.png', outside the folder"),
    ('{"file_name": "red/nope.png", "text": "a"}\n', r"captions 'red/nope.png', which is not an image there"),
    ('{"file_name": "red/000.png", "text": "a"}\n{"file_name": "red/000.png", "text": "b"}\n',
     r"captions 'red/000.png' twice \(line 2\)"),
    ('{"file_name": "red/000.png", "text": "a"}\n',
     r"'blue/001.png' in folder .* has no caption: metadata.jsonl captions 1 of its 4 images; add a line for every "
     r"image \(or remove metadata.jsonl\)"),
])
def test_bad_captions_are_named_before_any_work(tmp_path, metadata, message):
    from tdcdiff.data import DataError, load_dataset

    folder = captioned_folder(tmp_path / "data", count=4)
    (folder / "metadata.jsonl").write_text(metadata)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(str(folder))
    assert "\n" not in str(caught.value)


# -- the text encoder and tokenizer ---------------------------------------------------------------------------------
def test_a_pipeline_brings_its_text_encoder_and_a_tokenizer_built_from_plain_data(tmp_path, pipeline_dir, loaded):
    from transformers import CLIPTokenizer

    from tdcdiff.serialization import load_model, save_model
    from tdcdiff.text import TextEncoder, read_tokenizer, save_tokenizer

    assert type(loaded.model).__name__ == "UNet2DConditionModel" and loaded.text_encoder.width == TEXT_WIDTH
    vocab, merges = clip_vocabulary()
    reference = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    prompts = ["a red square on the left", "", "a blue circle"]
    ids = reference(prompts, padding="max_length", max_length=77).input_ids
    assert reference.tokenize("a red square") == ["a</w>", "red</w>", "square</w>"]
    # transformers 5 saved tokenizer.json; the Hub's pipelines (transformers 4) hold vocab.json and merges.txt.
    assert (pipeline_dir / "tokenizer" / "tokenizer.json").exists()
    for tokenizer in (loaded.text_encoder.tokenizer, read_tokenizer(write_tokenizer_files(tmp_path / "v4"))):
        assert tokenizer(prompts, padding="max_length", max_length=77).input_ids == ids
    save_tokenizer(loaded.text_encoder.tokenizer, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["merges.txt", "tokenizer_config.json",
                                                                      "vocab.json"]
    again = read_tokenizer(tmp_path / "saved")
    assert again(prompts, padding="max_length", max_length=77).input_ids == ids
    # The text encoder survives tdcdiff's own save (architecture.json + safetensors) exactly.
    save_model(loaded.text_encoder.text_model, tmp_path / "encoder")
    embeddings = loaded.text_encoder(prompts)
    assert embeddings.shape == (3, 77, TEXT_WIDTH) and embeddings.dtype == torch.float32
    assert torch.equal(TextEncoder(load_model(tmp_path / "encoder"), again)(prompts), embeddings)
    assert not torch.equal(embeddings[0], embeddings[1])  # the prompt matters


def test_a_pipeline_saved_by_transformers_4_loads_the_same_text_encoder(tmp_path, pipeline_dir, loaded):
    """The Stable Diffusion pipelines on the Hub were saved by transformers 4: vocab.json and merges.txt, and the
    text encoder's weights under `text_model.` (transformers 5 drops the prefix) with `position_ids` beside them."""
    from safetensors.torch import load_file, save_file

    from tdcdiff.base_model import load_base_model

    old = Path(shutil.copytree(pipeline_dir, tmp_path / "v4"))
    shutil.rmtree(old / "tokenizer")
    write_tokenizer_files(old / "tokenizer")
    weights = old / "text_encoder" / "model.safetensors"
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in load_file(weights).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, weights)
    text = load_base_model(str(old)).text_encoder
    prompts = ["a red square on the left", "a blue circle", ""]
    assert torch.equal(text(prompts), loaded.text_encoder(prompts))


def _pipeline_variant(tmp_path, source, change) -> Path:
    target = Path(shutil.copytree(source, tmp_path / "variant"))
    change(target)
    return target


def _json_edit(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("change, message", [
    (lambda d: _json_edit(d / "model_index.json", tokenizer=["transformers", "T5Tokenizer"]),
     r"the text_encoder \['transformers', 'CLIPTextModel'\] and tokenizer \['transformers', 'T5Tokenizer'\] are not "
     r"ones tdcdiff loads; supported: transformers CLIPTextModel with transformers CLIPTokenizer"),
    (lambda d: (d / "text_encoder" / "model.safetensors").rename(d / "text_encoder" / "pytorch_model.bin"),
     r"text_encoder has no model.safetensors \(one file\); tdcdiff never unpickles weights"),
    (lambda d: _json_edit(d / "tokenizer" / "tokenizer_config.json", model_max_length=64),
     r"model_max_length is 64, but tdcdiff counts, traces and times text-conditional models at CLIP's 77 tokens"),
    (lambda d: _json_edit(d / "tokenizer" / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer"),
     r"names tokenizer class 'GPT2Tokenizer'; tdcdiff builds only CLIPTokenizer, CLIPTokenizerFast"),
    (lambda d: _json_edit(d / "text_encoder" / "config.json", hidden_size=32),
     r"cannot load the text encoder of .*: .*model.safetensors does not fit the architecture in "
     r".*config.json: 'embeddings.position_embedding.weight' is \(77, 24\), its config makes it \(77, 32\)"),
])
def test_a_text_pipeline_that_cannot_be_loaded_is_named(tmp_path, pipeline_dir, change, message):
    from tdcdiff.base_model import BaseModelError, load_base_model

    variant = _pipeline_variant(tmp_path, pipeline_dir, change)
    with pytest.raises(BaseModelError, match=message) as caught:
        load_base_model(str(variant))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("changes, message", [
    ({"cross_attention_dim": 16}, r"the UNet's cross_attention_dim is 16 but the text encoder's hidden size is 24; use "
                                  r"the text encoder the UNet was trained with"),
    ({"num_class_embeds": 10}, r"a text-conditional model takes the timestep and one text embedding \(Stable "
                               r"Diffusion's UNet2DConditionModel\), but it sets num_class_embeds"),
])
def test_the_unet_must_fit_the_text_encoder(tmp_path, pipeline_dir, changes, message):
    from tdcdiff.base_model import BaseModelError, load_base_model

    variant = Path(shutil.copytree(pipeline_dir, tmp_path / "variant"))
    shutil.rmtree(variant / "unet")
    _unet(**changes).save_pretrained(variant / "unet")
    with pytest.raises(BaseModelError, match=message):
        load_base_model(str(variant))


@pytest.mark.parametrize("captions, pipeline, message", [
    (True, False, r"is text-conditional \(cross_attention_dim 24\) but comes without a text encoder and tokenizer; "
                  r"pass its pipeline directory \(model_index.json naming the unet, text_encoder and tokenizer\)"),
    (False, True, r"is text-conditional but the data '.*data' has no captions; add a metadata.jsonl to the image "
                  r"folder, one \{\"file_name\": ..., \"text\": ...\} per image"),
])
def test_a_text_model_without_its_encoder_or_captions_is_named_before_any_work(tmp_path, pipeline_dir, captions,
                                                                               pipeline, message):
    data = captioned_folder(tmp_path / "data", count=4)
    if not captions:
        (data / "metadata.jsonl").unlink()
    base = pipeline_dir
    if not pipeline:  # the UNet alone, taking the 3-channel 16x16 images themselves
        base = tmp_path / "unet_only"
        _unet(in_channels=3, out_channels=3, sample_size=16).save_pretrained(base)
    out = tmp_path / "run"
    result = CliRunner().invoke(_app(), ["run", "--base", str(base), "--data", str(data), "--out", str(out),
                                         "--quiet"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert __import__("re").search(message, " ".join(result.output.split())), result.output
    assert not (out / "base").exists()


def _app():
    from tdcdiff.cli import app

    return app


# -- cross-attention heads ------------------------------------------------------------------------------------------
def test_cross_attention_loses_whole_heads_and_keeps_its_text_width():
    from tdcdiff.flops import count_flops
    from tdcdiff.models import Denoiser
    from tdcdiff.prune.engine import prune
    from tdcdiff.prune.fit import fit_to_budget
    from tdcdiff.prune.units import prunable_units, uniform_proposal

    unet = _unet()
    heads = {name: (m.heads, m.to_k.weight.detach().clone()) for name, m in unet.named_modules()
             if name.endswith("attn2")}
    assert len(heads) == 4  # the down block's, the mid block's and the up block's two transformers
    pruned = prune(unet, {u.name: 0.5 for u in prunable_units(unet)}, SHAPE)
    for name, (before, keys) in heads.items():
        attention = pruned.get_submodule(name)
        dim = keys.shape[0] // before
        assert attention.heads == before // 2 and attention.to_q.out_features == attention.heads * dim
        # The text width is the encoder's: never pruned; each kept head's key rows are one whole original head.
        assert attention.to_k.in_features == attention.to_v.in_features == TEXT_WIDTH
        original = keys.view(before, dim, TEXT_WIDTH)
        kept = attention.to_k.weight.detach().view(attention.heads, dim, TEXT_WIDTH)
        assert all(any(torch.equal(k, o) for o in original) for k in kept)
        assert attention.to_out[0].in_features == attention.heads * dim
    text = torch.randn(2, 77, TEXT_WIDTH)
    assert Denoiser(pruned)(torch.randn(2, *SHAPE), torch.tensor([3, 900]), text).shape == (2, *SHAPE)
    # A budget is met within 3%, and the FLOPs are those the fit measured whichever channels magnitude keeps:
    # GEGLU's two halves are cut together (plan._copies).
    base = count_flops(unet, SHAPE)
    for fraction in (0.7, 0.5):
        fit = fit_to_budget(unet, uniform_proposal(unet), fraction * base, SHAPE)
        assert abs(fit.flops / (fraction * base) - 1) <= 0.03
        assert count_flops(fit.model, SHAPE) == fit.flops == count_flops(prune(unet, fit.decision, SHAPE), SHAPE)


# -- training: caption dropout ------------------------------------------------------------------------------------
def test_caption_dropout_trains_with_the_empty_prompts_embedding():
    from tdcdiff.train import TrainConfig
    from tdcdiff.train.batch import TrainingBatches, conditioning

    unet = _unet()
    captions, empty = torch.randn(10, 77, TEXT_WIDTH), torch.randn(77, TEXT_WIDTH)
    config = TrainConfig(label_dropout=0.5, batch_size=64)
    labels, null = conditioning(unet, captions, 10, config, empty)
    batches = TrainingBatches(torch.randn(10, *SHAPE), labels, null, torch.arange(1000), 1000, config, 64, 0,
                              torch.device("cpu"))
    y = batches.draw(0).y
    dropped = torch.tensor([torch.equal(row, empty) for row in y])
    assert y.shape == (64, 77, TEXT_WIDTH) and 10 < int(dropped.sum()) < 54
    assert all(any(torch.equal(row, c) for c in captions) for row in y[~dropped])
    with pytest.raises(ValueError, match=r"label_dropout > 0 \(caption dropout\) needs null_text, the empty prompt's"):
        conditioning(unet, captions, 10, config)
    with pytest.raises(ValueError, match=r"the model is text-conditional \(cross_attention_dim 24\): give one text "
                                         r"embedding per image, float \(10, tokens, 24\), got \(10,\)"):
        conditioning(unet, torch.zeros(10, dtype=torch.long), 10, config, empty)


# -- sampling -------------------------------------------------------------------------------------------------------
def test_sampling_a_text_model_needs_prompts_and_guides_against_the_empty_prompt(loaded, scheduler):
    from tdcdiff.models import with_null_text
    from tdcdiff.pipeline import TDCPipeline, sample

    unet, text = loaded.model, loaded.text_encoder
    prompts = text(["a red square", "a blue circle"])
    kwargs = dict(sample_shape=SHAPE, steps=3, num_images=2, progress=False)
    with pytest.raises(ValueError, match=r"the model is text-conditional \(cross_attention_dim 24\): pass "
                                         r"prompt_embeds"):
        sample(unet, scheduler, **kwargs)
    with pytest.raises(ValueError, match=r"takes prompts .* not class_labels"):
        sample(unet, scheduler, class_labels=[0, 1], **kwargs)
    with pytest.raises(ValueError, match=r"guidance_scale != 1 needs negative_prompt_embeds"):
        sample(unet, scheduler, prompt_embeds=prompts, guidance_scale=3.0, **kwargs)
    empty = text.empty()
    guided = sample(unet, scheduler, prompt_embeds=prompts, guidance_scale=3.0, negative_prompt_embeds=empty, **kwargs)
    # A model that carries the empty prompt guides against it by default, and samples unconditionally without one.
    carried = with_null_text(unet, empty)
    assert torch.equal(sample(carried, scheduler, prompt_embeds=prompts, guidance_scale=3.0, **kwargs).images,
                       guided.images)
    plain = sample(carried, scheduler, prompt_embeds=prompts, **kwargs).images
    assert (plain - guided.images).abs().max() > 1e-4
    unconditional = sample(carried, scheduler, **kwargs).images
    assert torch.equal(unconditional, sample(carried, scheduler, prompt_embeds=empty[None], **kwargs).images)

    pipe = TDCPipeline(carried, scheduler, SHAPE, text_encoder=text)
    out = pipe(prompt=["a red square", "a blue circle"], num_inference_steps=3, output_type="pt", progress=False)
    assert torch.equal(out.images, plain)
    with pytest.raises(ValueError, match=r"this pipeline is text-conditional: pass prompt="):
        pipe(num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"3 prompts in prompt for batch_size 2"):
        pipe(batch_size=2, prompt=["a", "b", "c"], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"prompt was given but this pipeline has no text encoder"):
        TDCPipeline(carried, scheduler, SHAPE)(prompt="a", num_inference_steps=2, progress=False)


# -- the bundle: its text encoder and tokenizer are untrusted input ----------------------------------------------------
@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory, loaded):
    """A bundle of two copies of the tiny pipeline's UNet with its text encoder and tokenizer (no VAE)."""
    from tdcdiff.bundle import save_bundle
    from tdcdiff.flops import count_flops
    from tdcdiff.grouping import make_groups
    from tdcdiff.schedule import make_scheduler

    scheduler = make_scheduler(1000)
    experts = [loaded.model, loaded.model]
    flops = [count_flops(e, SHAPE) for e in experts]
    return save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", experts, make_groups("uniform", 2, scheduler),
                       scheduler, sample_shape=SHAPE, expert_flops=flops, base_flops=flops[0],
                       text_encoder=loaded.text_encoder)


def _tampered(text_bundle, tmp_path, name, change, *, rehash=True):
    """A copy of the bundle with one file changed (and the manifest updated to match it, as a deliberate tamperer
    would, unless rehash is False)."""
    bundle = Path(shutil.copytree(text_bundle, tmp_path / "bundle"))
    path = bundle / name
    path.write_bytes(change(path.read_bytes()))
    if rehash:
        manifest = json.loads((bundle / "manifest.json").read_text())
        data = path.read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def _json_bytes(**changes):
    return lambda data: json.dumps({**json.loads(data), **changes}).encode()


def test_a_text_bundle_samples_prompts_as_the_models_do(text_bundle, loaded):
    from tdcdiff.bundle import load_bundle
    from tdcdiff.models import with_null_text
    from tdcdiff.pipeline import sample

    bundle = load_bundle(text_bundle)
    assert bundle.manifest["text"] == {"text_encoder": "text_encoder", "tokenizer": "tokenizer", "width": 24,
                                       "tokens": 77}
    assert sorted(n for n in bundle.manifest["files"] if n.startswith(("text_encoder/", "tokenizer/"))) == [
        "text_encoder/architecture.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
    prompts = ["a red square on the left", "a blue circle"]
    images = bundle.pipeline()(prompt=prompts, num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                               progress=False).images
    text = loaded.text_encoder
    expected = sample(with_null_text(loaded.model, text.empty()), bundle.scheduler, sample_shape=SHAPE, steps=3,
                      num_images=2, prompt_embeds=text(prompts), guidance_scale=2.0, progress=False).images
    assert images.shape == (2, *SHAPE) and torch.equal(images, expected)
    pil = bundle.pipeline()(prompt="a red square", batch_size=2, num_inference_steps=2, progress=False).images
    assert len(pil) == 2 and pil[0].size == (8, 8)


@pytest.mark.parametrize("name, change, rehash, message", [
    ("tokenizer/vocab.json", lambda d: d.replace(b'"red</w>"', b'"rod</w>"'), False,
     r"bundle file .*tokenizer/vocab.json is corrupted: its sha256 does not match the manifest"),
    ("text_encoder/model.safetensors", lambda d: d[:-4] + b"\0\0\0\0", False,
     r"text_encoder/model.safetensors is corrupted: its sha256 does not match the manifest"),
    ("text_encoder/architecture.json", _json_bytes(**{"class": "transformers.CLIPVisionModel"}), True,
     r"cannot load the text encoder of bundle .*: .*text_encoder/architecture.json names class "
     r"'transformers.CLIPVisionModel'; a bundle's text encoder must be one of transformers.CLIPTextModel"),
    ("text_encoder/architecture.json", _json_bytes(**{"class": "subprocess.Popen"}), True,
     r"names class 'subprocess.Popen'; a bundle's text encoder must be one of transformers.CLIPTextModel"),
    ("tokenizer/tokenizer_config.json", _json_bytes(model_max_length=4096), True,
     r"cannot load the text encoder of bundle .*: .*tokenizer settings: model_max_length is 4096, but tdcdiff counts"),
    ("tokenizer/tokenizer_config.json", _json_bytes(**{"class": "PreTrainedTokenizerFast"}), True,
     r"names tokenizer class 'PreTrainedTokenizerFast'; tdcdiff builds only CLIPTokenizer"),
    ("tokenizer/vocab.json", lambda d: b'["a", "b"]', True,
     r"tokenizer vocabulary must map each token \(a string\) to its id"),
    ("tokenizer/merges.txt", lambda d: d + b"a b c\n", True, r"merge 'a b c' is not two tokens separated by one space"),
    ("tokenizer/merges.txt", lambda d: d + b"x y\n", True, r"cannot build a CLIPTokenizer from it"),
    ("manifest.json", lambda d: json.dumps({**json.loads(d), "text": None}).encode(), False,
     r"the experts are text-conditional \(cross_attention_dim 24\) but the bundle holds no text encoder"),
    ("manifest.json", lambda d: json.dumps({**json.loads(d), "text": {"text_encoder": "/etc"}}).encode(), False,
     r"'text' must be \{\"text_encoder\": \"text_encoder\", \"tokenizer\": \"tokenizer\", \"width\""),
])
def test_a_tampered_text_encoder_or_tokenizer_is_refused_in_one_line(text_bundle, tmp_path, name, change, rehash,
                                                                     message):
    from tdcdiff.bundle import BundleError, load_bundle

    bundle = _tampered(text_bundle, tmp_path, name, change, rehash=rehash)
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_a_tampered_tokenizer_with_one_error_line(text_bundle, tmp_path):
    bundle = _tampered(text_bundle, tmp_path, "tokenizer/merges.txt", lambda d: d + b"a b c\n")
    result = CliRunner().invoke(_app(), ["sample", "--bundle", str(bundle), "--num", "2", "--steps", "2",
                                         "--output", str(tmp_path / "x.png"), "--quiet"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "merge 'a b c' is not two tokens" in result.output and not (tmp_path / "x.png").exists()


# -- the whole method, from the command line ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_stable_diffusion_pipeline_goes_from_tdcdiff_run_to_a_bundle_that_takes_prompts(tmp_path, pipeline_dir):
    from dataclasses import replace

    from safetensors.torch import load_file

    from conftest import tiny_config
    from tdcdiff.bundle import load_bundle
    from tdcdiff.latent import Decoder
    from tdcdiff.pipeline import sample
    from tdcdiff.router import Router
    from tdcdiff.run import Run
    from tdcdiff.serialization import load_model
    from tdcdiff.text import TextEncoder

    data = captioned_folder(tmp_path / "data")
    config = tiny_config(groups=2)
    config.finetune = replace(config.finetune, label_dropout=0.2)  # caption dropout: guidance has an uncond model
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "run"
    result = CliRunner().invoke(_app(), ["run", "--base", str(pipeline_dir), "--data", str(data), "--config",
                                         str(config_file), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (out / "base" / "train.json").exists() and (out / "report" / "report.html").exists()

    # The captions' embeddings were computed once with the pipeline's text encoder, and are reused.
    run = Run(out, progress=False)
    cached = load_file(out / "text" / "embeddings.safetensors")
    encoder = TextEncoder(load_model(out / "base" / "text_encoder"), run.text_encoder.tokenizer)
    assert torch.equal(cached["captions"], encoder(run.pixels.captions)) and torch.equal(cached["empty"],
                                                                                        encoder.empty())
    stamp = (out / "text" / "embeddings.safetensors").stat().st_mtime_ns
    run.text_encoder.text_model.forward = None  # a second encoding would fail
    train, held = run.labels(run.base_model())
    assert train.shape[1:] == (77, TEXT_WIDTH) and len(train) + len(held) == len(run.pixels)
    assert (out / "text" / "embeddings.safetensors").stat().st_mtime_ns == stamp

    summaries = [json.loads((out / "prune" / f"summary_{i}.json").read_text()) for i in range(2)]
    assert all(abs(s["flops"] / s["budget"] - 1) <= 0.03 for s in summaries), summaries
    assert summaries[0]["fraction"] < 1 and summaries[0]["flops"] < summaries[1]["flops"]

    bundle = load_bundle(out / "bundle")
    assert bundle.vae is not None and bundle.text_encoder.width == TEXT_WIDTH
    images = bundle.pipeline()(prompt="a red square", batch_size=2, num_inference_steps=4, output_type="pt",
                               guidance_scale=3.0, progress=False).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    pil = bundle.pipeline()(prompt=["a red square", "a blue circle"], num_inference_steps=4, progress=False).images
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    # The loaded bundle samples exactly as the router of the fine-tuned experts does.
    experts = [load_model(out / "finetune" / f"group_{i}" / "final") for i in range(2)]
    in_memory = Router(experts, bundle.router.grouping).eval()
    prompts = bundle.text_encoder(["a red square", "a blue circle on the left"])
    expected = sample(in_memory, run.scheduler, sample_shape=run.sample_shape, sampler=bundle.sampling.sampler,
                      steps=4, num_images=2, seed=5,
                      prompt_embeds=prompts, guidance_scale=3.0, negative_prompt_embeds=bundle.text_encoder.empty(),
                      decode=Decoder(run.vae), progress=False).images
    got = bundle.pipeline()(prompt=["a red square", "a blue circle on the left"], num_inference_steps=4, seed=5,
                            guidance_scale=3.0, output_type="pt", progress=False).images
    assert torch.equal(got, expected)
