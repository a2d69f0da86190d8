"""backbone.precision: the image tower in fp32 / tf32 / bf16 / fp16, everything after it float32.

Reproduces the half-precision crash of issue 9 (dtype taken from the first parameter, which open_clip keeps in
float32, while conv1 is bf16) and checks that tune + score in bf16 and fp16 on the CPU stay close to fp32.
Tolerances (apt-tiny, random weights, scores spread over ≈ 0.25–0.41): with the same prompts, scores and maps
within 0.01 of fp32; after tuning in that precision, within 0.06, map correlation ≥ 0.99, learned text features
cos ≥ 0.99 (measured: 0.003 / 0.023 / 0.997 / 0.997 for bf16).
"""
import open_clip
import pytest
import torch

import apt_lab
from apt_lab.backbone import PRECISIONS, Backbone, pick_precision
from apt_lab.config import APTConfig
from apt_lab.scoring import score

CONFIG = APTConfig.preset("quick", train__steps=8, train__pool_size=8, perturb__region="image")


@pytest.fixture(scope="module")
def data():
    dataset = apt_lab.data.load_dataset("demo", category="brick")
    return dataset.train.images(224, [0, 1]), dataset.test.images(224, list(range(6)))  # shots, test images


@pytest.fixture(scope="module")
def fp32_run(data):
    shots, test = data
    backbone = apt_lab.load_backbone("apt-tiny", device="cpu", precision="fp32")
    tuned = apt_lab.tune_prompts(backbone, shots, CONFIG, progress=False)
    return tuned, score(backbone, tuned.prompts, test, CONFIG)


def test_dtype_comes_from_the_image_towers_conv_weight_not_the_first_parameter():
    model = open_clip.create_model("apt-tiny", precision="bf16", device="cpu")  # open_clip's mixed bf16
    first = next(model.parameters())
    assert first.dtype == torch.float32 and model.visual.conv1.weight.dtype == torch.bfloat16  # the trap
    backbone = Backbone(model, "apt-tiny", None, False, None, torch.device("cpu"))
    assert backbone.dtype == torch.bfloat16 and backbone.precision == "bf16"
    features = backbone.encode_images(torch.rand(2, 3, 224, 224))  # crashed: "Input type ... should be the same"
    assert features.cls.dtype == features.patches.dtype == torch.float32
    assert torch.isfinite(features.patches).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32"])
def test_load_backbone_keeps_the_asked_precision_on_the_cpu(precision):
    backbone = apt_lab.load_backbone("apt-tiny", device="cpu", precision=precision)
    assert backbone.precision == precision and backbone.dtype == PRECISIONS[precision]
    assert all(p.dtype == PRECISIONS[precision] for p in backbone.model.visual.parameters())  # the whole tower
    assert backbone.model.token_embedding.weight.dtype == torch.float32  # the text tower stays float32
    embeddings, eot = backbone.token_embeddings(["a photo of a damaged object."])
    assert backbone.encode_prompt_embeddings(embeddings, eot).dtype == torch.float32
    assert backbone.encode_texts(["a photo"]).dtype == torch.float32


def test_default_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    assert pick_precision(None, torch.device("cuda")) == "bf16"
    assert pick_precision(None, torch.device("cpu")) == "fp32"
    assert apt_lab.load_backbone("apt-tiny", device="cpu").precision == "fp32"
    assert APTConfig().backbone.precision is None
    with pytest.raises(ValueError, match="choose one of"):
        apt_lab.load_backbone("apt-tiny", device="cpu", precision="fp8")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by scripts/gpu_check.py)")


@pytest.mark.parametrize("device,precision", [("cpu", "bf16"), ("cpu", "fp16"),
                                              *(pytest.param("cuda", p, marks=CUDA) for p in ("bf16", "fp16", "tf32"))])
def test_tune_and_score_in_half_precision_stay_close_to_fp32(device, precision, data, fp32_run):
    shots, test = data
    reference_tuned, reference = fp32_run  # float32 on the CPU
    backbone = apt_lab.load_backbone("apt-tiny", device=device, precision=precision)
    same_prompts = score(backbone, reference_tuned.prompts, test, CONFIG)
    assert same_prompts.image_scores.dtype == same_prompts.anomaly_maps.dtype == torch.float32
    assert (same_prompts.image_scores - reference.image_scores).abs().max() < 0.01
    assert (same_prompts.anomaly_maps - reference.anomaly_maps).abs().max() < 0.01

    tuned = apt_lab.tune_prompts(backbone, shots, CONFIG, progress=False)
    assert all(p.dtype == torch.float32 for p in tuned.prompts.parameters())  # prompt parameters stay float32
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in tuned.history)
    out = score(backbone, tuned.prompts, test, CONFIG)
    assert (out.image_scores - reference.image_scores).abs().max() < 0.06
    assert (out.anomaly_maps - reference.anomaly_maps).abs().max() < 0.06
    maps = torch.stack([out.anomaly_maps.flatten(), reference.anomaly_maps.flatten()])
    assert torch.corrcoef(maps)[0, 1] > 0.99
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(tuned.prompts.text_features().cpu(),
                                                    reference_tuned.prompts.text_features().cpu())
    assert cos.min() > 0.99
    assert reference.image_scores.max() - reference.image_scores.min() > 0.1  # the tolerances are meaningful
