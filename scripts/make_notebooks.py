"""Write notebooks/*.ipynb from the cell lists below (the reviewable source of the notebooks).

Usage: python scripts/make_notebooks.py [--check]

Each notebook is a list of ("md" | "code", source) cells, following the rhythm explain → call → assert →
picture. The generated files carry no outputs and no execution counts; ``--check`` exits 1 when a committed
notebook differs from what this script would write (CI can run it).

Forks: change REPO (organisation/name on GitHub) and re-run; the Colab badges and install lines follow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

REPO = "apt-lab/apt_lab"
BRANCH = "main"
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

INSTALL = f'''# Colab only: install apt_lab (a no-op everywhere else, e.g. in a clone with `make install`).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "apt-lab @ git+https://github.com/{REPO}"],
                   check=True)'''

SETUP = '''import torch

import apt_lab
from apt_lab import plots, widgets
from apt_lab.notebook import setup

session = setup(seed=0)      # quick mode on a CPU (or APT_LAB_QUICK=1), full mode on a GPU
config = session.config
backbone = session.backbone()
backbone'''


def header(name: str, title: str, learn: str, full: str) -> tuple[str, str]:
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}.ipynb)")
    return ("md", f"""# {title}

{badge}

**What you will learn:** {learn}

**Time and hardware:** quick mode (CPU, tiny model with random weights, demo photos) runs in under a minute on
2 CPU cores; full mode ({full}) needs a GPU — in Colab choose *Runtime → Change runtime type → GPU*.
Quick mode shows the mechanics, never accuracy.""")


def opening(name, title, learn, full):
    return [header(name, title, learn, full), ("code", INSTALL),
            ("md", "Setup: device, seeds and mode are chosen and printed (`APT_LAB_QUICK=1` forces quick mode)."),
            ("code", SETUP)]


# ------------------------------------------------------------------------------------------------ 00 tour
TOUR = opening("00_tour", "00 · A tour of APT in ten lines",
               "the four verbs of apt_lab — perturb, tune prompts, align, score — run end to end on one category.",
               "ViT-B-16 / openai, about 2 minutes per category") + [
    ("md", """## The whole pipeline

APT needs only a few **normal** images of a product (the *shots*). From them it makes synthetic anomalies
(CFG), learns a "normal" and an "anomalous" prompt for the frozen CLIP model (guided by a meta-prompt, SMGS),
and then scores every test image and every pixel. The test labels are used only at the very end, to measure."""),
    ("code", """data = session.dataset("brick")                                              # a category: train (normal) + test (labelled)
shots = data.train.images(backbone.image_size, apt_lab.data.few_shot(data, k=session.k)).to(backbone.device)  # (k, 3, S, S) shots
tuned = apt_lab.tune_prompts(backbone, shots, config, progress=False)        # CFG + learnable prompts + SMGS
test_images = data.test.images(backbone.image_size)                          # (T, 3, S, S)
scores = apt_lab.score(backbone, tuned.prompts, test_images, config)         # image scores and anomaly maps
masks = data.test.masks(backbone.image_size)                                 # (T, S, S) ground truth
results = apt_lab.metrics.evaluate(scores.image_scores, scores.anomaly_maps, data.test.labels, masks)
{name: round(value, 3) for name, value in results.items()}"""),
    ("md", "Every output has the shape the contract promises, and every metric is a probability-like number:"),
    ("code", """# NBVAL_CHECK_OUTPUT
print("shots", tuple(shots.shape), "| test", tuple(test_images.shape), "| maps", tuple(scores.anomaly_maps.shape))
print("steps recorded:", len(tuned.history), "| history keys:", sorted(tuned.history[0])[:4])
assert scores.image_scores.shape == (len(data.test),)
assert scores.anomaly_maps.shape == (len(data.test), backbone.image_size, backbone.image_size)
assert all(0.0 <= value <= 1.0 for value in results.values())
first, last = tuned.history[0]["loss"], sum(r["loss"] for r in tuned.history[-5:]) / 5
assert last < first, f"tuning did not reduce the loss ({first:.3f} → {last:.3f})\""""),
    ("md", """## The picture

Anomaly maps over the test images — **one colour range for all of them** (per-image ranges would make the
normal images look anomalous). White outlines are the true defects. With random weights (quick mode) the maps
are noisy; with real CLIP weights (full mode) they light up on the defects."""),
    ("code", """show = [i for i, d in enumerate(data.test.defects) if d == "good"][:2] + \\
       [i for i, d in enumerate(data.test.defects) if d != "good"][:6]
plots.anomaly_map_grid(test_images[show], scores.anomaly_maps[show], masks[show],
                       titles=[f"{data.test.defects[i]} · {scores.image_scores[i]:.2f}" for i in show])"""),
    ("code", "plots.training_curves_figure(tuned.history)"),
    ("md", """## Where next

[01](01_perturb.ipynb) synthetic anomalies · [02](02_prompts.ipynb) learnable prompts ·
[03](03_smgs.ipynb) SMGS · [04](04_score.ipynb) maps, scores and thresholds · [05](05_benchmark.ipynb)
baselines and ablations · [06](06_your_perturbation.ipynb) your own perturbation · [07](07_your_data.ipynb)
your own images."""),
]

# ---------------------------------------------------------------------------------------------- 01 perturb
PERTURB = opening("01_perturb", "01 · Perturb: anomalies made from normal images (CFG)",
                  "where CFG puts synthetic anomalies (the region of interest), which generators it uses, and what "
                  "strength does — live in a widget.", "ViT-B-16 / openai, under a minute") + [
    ("md", """## Shots

APT never sees a real defect while it learns. It takes a few normal images and damages them itself."""),
    ("code", """data = session.dataset("coins")                  # an object category: the region of interest matters here
shots = data.train.images(backbone.image_size, apt_lab.data.few_shot(data, k=4)).to(backbone.device)  # (4, 3, S, S)
tuple(shots.shape)"""),
    ("md", """## Region of interest

Anomalies should land on the object, not on the background. The frozen model itself finds the object: each patch
token is compared with "a photo of an object." and "a photo of the background.", the difference is thresholded
(Otsu) and dilated. Where the foreground covers most of the image (a texture), the whole image is allowed.
With random weights (quick mode) the region is arbitrary; with CLIP weights it follows the coin."""),
    ("code", """roi = apt_lab.region_of_interest(backbone, shots, config)          # (4, S, S) bool
print(tuple(roi.shape), roi.dtype, [f"{float(r.float().mean()):.0%}" for r in roi])
assert roi.shape == shots.shape[:1] + shots.shape[2:] and roi.dtype == torch.bool
assert all(r.any() for r in roi), "every image keeps at least one allowed pixel\""""),
    ("code", """plots.anomaly_map_grid(shots, roi.float(), roi, opacity=0.35, titles=[f"shot {i}" for i in range(len(shots))])"""),
    ("md", """## Generators

Each image gets one generator from `config.perturb.generators`, a random blob inside the region, and a strength.
Every generator is a registered function; the mask it returns is exact: **pixels change only inside the mask**."""),
    ("code", """# NBVAL_CHECK_OUTPUT
print("registered:", apt_lab.list_perturbations())
print("pixel space:", apt_lab.list_perturbations("pixel"))"""),
    ("code", """outs = {}
for name in apt_lab.list_perturbations("pixel"):
    cfg = config.replace(perturb__generators=(name,))
    outs[name] = out = apt_lab.perturb(shots, cfg, torch.Generator().manual_seed(0), roi=roi, backbone=backbone)
    changed = (out.images - shots).abs().amax(dim=1) > 0               # (4, S, S) pixels that changed
    assert not (changed & ~out.masks).any(), f"{name} changed pixels outside its mask"
    assert out.patch_masks.shape[1:] == backbone.grid                  # the same mask on the patch grid
    assert not (out.masks & ~roi).any()                                 # inside the region of interest
print({name: f"{float(out.masks.float().mean()):.1%} of pixels" for name, out in outs.items()})"""),
    ("code", """names = list(outs)
plots.anomaly_map_grid(torch.stack([outs[n].images[0] for n in names]), torch.stack([outs[n].masks[0].float() for n in names]),
                       torch.stack([outs[n].masks[0] for n in names]), opacity=0.0, titles=names)"""),
    ("md", """## Strength

Strength scales the noise. Same seed, same blob, growing strength → growing change inside the mask; strength 0
changes nothing. And the same seed always gives the same anomaly."""),
    ("code", """strengths = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
change = []
for s in strengths:
    cfg = config.replace(perturb__generators=("gaussian",), perturb__strength=(s, s))
    out = apt_lab.perturb(shots[:1], cfg, torch.Generator().manual_seed(3), roi=roi[:1], backbone=backbone)
    change.append(float((out.images - shots[:1]).abs().mean(dim=1)[out.masks].mean()))
again = apt_lab.perturb(shots[:1], cfg, torch.Generator().manual_seed(3), roi=roi[:1], backbone=backbone)
assert torch.equal(again.images, out.images), "same seed, same anomaly"
assert change[0] == 0 and all(a <= b + 1e-6 for a, b in zip(change, change[1:])), change
import plotly.graph_objects as go
go.Figure(go.Scatter(x=strengths, y=change, mode="lines+markers")).update_layout(
    title="mean absolute change inside the mask (gaussian)", xaxis_title="strength", yaxis_title="|Δ pixel|", height=320)"""),
    ("md", """## Try it

Move the controls: **generator**, **strength**, **region of interest** on/off, **seed**, and the image. The left
panel outlines the region of interest (yellow), the right one marks the anomaly mask in red."""),
    ("code", """explorer = widgets.perturbation_explorer(backbone, shots, config)
explorer"""),
    ("md", "The widget is driven by the same calls from code — this is what its unit test does:"),
    ("code", """before = explorer.figure.data[2].source
explorer.controls["strength"].value = 0.9
explorer.controls["seed"].value = 5
assert explorer.last.strengths[0] == 0.9 and explorer.figure.data[2].source != before
explorer.info.value"""),
]

# --------------------------------------------------------------------------------------------- 02 prompts
PROMPTS = opening("02_prompts", "02 · Prompts: learned instead of written",
                  "how learnable context vectors replace human-written anomaly prompts, how they flow through CLIP's "
                  "text encoder, and what they end up close to.", "ViT-B-16 / openai, about a minute") + [
    ("md", """## Human prompts (the baseline)

WinCLIP writes the prompts by hand: 7 normal states × 22 templates and 4 anomalous states × 22 templates,
averaged into one embedding per class. APT claims to do better with **no** such words."""),
    ("code", """# NBVAL_CHECK_OUTPUT
normal_sentences, anomalous_sentences = apt_lab.scoring.human_prompt_sentences("object")
print(len(normal_sentences), len(anomalous_sentences))
print(anomalous_sentences[0])"""),
    ("code", """human = apt_lab.human_prompt_features(backbone, "object")     # (2, D): [normal, anomalous]
assert human.shape == (2, backbone.embed_dim) and torch.allclose(human.norm(dim=-1), torch.ones(2), atol=1e-5)
tuple(human.shape)"""),
    ("md", """## Learnable prompts

A prompt is the template `X X … X object.` whose `X` positions are free vectors in the text encoder's input
space (CoOp). One normal and one anomalous prompt form a pair; only those vectors are trained."""),
    ("code", """learner = apt_lab.PromptLearner(backbone, config.prompts, seed=0)
print(learner)
print("parameters:", [tuple(p.shape) for p in learner.parameters()])   # (2 prompts, n_ctx, width)
assert sum(p.numel() for p in learner.parameters()) == 2 * config.prompts.n_ctx * backbone.model.token_embedding.weight.shape[1]"""),
    ("md", """## How injected vectors flow through the text encoder

`backbone.token_embeddings(texts)` gives the encoder's input vectors; `backbone.encode_prompt_embeddings` runs the
frozen encoder on *any* such vectors and reads the end token. Feed it the real word vectors and it must
reproduce CLIP's own text embedding exactly — so learned vectors sit in the same space as words. Under the
causal mask the positions after the end token never matter, so the encoder may run on fewer than 77 positions."""),
    ("code", """text = "a photo of a damaged object."
embeddings, eot = backbone.token_embeddings([text])                  # (1, 77, W), end-token position
full = backbone.encode_prompt_embeddings(embeddings, eot)            # all 77 positions
short = backbone.encode_prompt_embeddings(embeddings[:, : int(eot) + 1], eot)   # only up to the end token
reference = backbone.encode_texts([text])
print(f"max |injected − encode_texts| = {float((full - reference).abs().max()):.1e}; "
      f"truncated to {int(eot) + 1} positions: {float((short - reference).abs().max()):.1e}")
assert torch.allclose(full, reference, atol=1e-5) and torch.allclose(short, reference, atol=1e-5)"""),
    ("md", """The same check through a `PromptLearner`: set its context vectors to the words "a photo of a damaged"
(five tokens) and it becomes the human sentence."""),
    ("code", """from apt_lab.config import PromptConfig

words = apt_lab.PromptLearner(backbone, PromptConfig(n_ctx=5, suffix="object."), seed=0)
words.set_context_words("a photo of a flawless", "a photo of a damaged")
expected = backbone.encode_texts(["a photo of a flawless object.", "a photo of a damaged object."])
with torch.no_grad():
    assert torch.allclose(words.text_features(), expected, atol=1e-5)
"identical\""""),
    ("md", """## Tune, then look at what was learned

After tuning, the learned features are compared with words and with the meta-prompt ("a photo of a flawless /
damaged object.") that guided them. With random weights (quick mode) the similarities are arbitrary; with CLIP
weights the anomalous prompt tends to move towards damage words."""),
    ("code", """data = session.dataset("brick")
shots = data.train.images(backbone.image_size, apt_lab.data.few_shot(data, k=session.k)).to(backbone.device)
start = learner.text_features().detach()
tuned = apt_lab.tune_prompts(backbone, shots, config, progress=False)
with torch.no_grad():
    learned = tuned.prompts.text_features()                             # (2, D)
assert not torch.allclose(learned, start), "tuning moved the prompts"
texts = [config.smgs.meta_normal, config.smgs.meta_anomalous, "a photo of a perfect object.",
         "a photo of a broken object.", "a photo of a scratch.", "a photo of a brick wall."]
similarity = apt_lab.prompts.similarity_to(tuned.prompts, texts)      # (2, T) cosine
assert similarity.shape == (2, len(texts)) and similarity.abs().max() <= 1 + 1e-5
import plotly.graph_objects as go
go.Figure(go.Heatmap(z=similarity.numpy(), x=texts, y=["learned normal", "learned anomalous"], colorscale="RdBu",
                     zmid=0, text=similarity.numpy().round(2), texttemplate="%{text}")).update_layout(
    title="cosine similarity of learned prompts to sentences (first two: the meta-prompt)", height=330)"""),
    ("code", """rows = apt_lab.prompts.nearest_words(tuned.prompts, k=3)
plots.metrics_table_figure([{"prompt": r["prompt"], "position": r["position"], "nearest words": ", ".join(r["words"]),
                             "distance": r["distances"][0]} for r in rows[:: max(1, len(rows) // 8)]])"""),
    ("md", """Nearest vocabulary words of a few learned vectors (CoOp's way of "reading" a prompt). Learned vectors are
usually far from every word: they are not sentences, which is exactly why no human wording limits them."""),
]

# ------------------------------------------------------------------------------------------------ 03 SMGS
SMGS = opening("03_smgs", "03 · SMGS: a meta-prompt that keeps learned prompts general",
               "the gradient rule of SMGS, what λ does, how the meta-prompt optimises itself, and how to watch a "
               "tuning run live.", "ViT-B-16 / openai, about 3 minutes") + [
    ("md", r"""## The rule, on two arrows

Each step has a *task* gradient $g_t$ (fit the synthetic anomalies) and a *meta* gradient $g_m$ (stay close to
the meta-prompt's predictions). When they conflict, $\langle g_t, g_m\rangle < 0$, SMGS removes λ times the
part of $g_t$ that points against $g_m$: $g = g_t - \lambda \langle g_t, \hat g_m\rangle \hat g_m$. With λ = 1
the update is orthogonal to $g_m$; λ = 0 is plain prompt tuning."""),
    ("code", """from apt_lab.smgs import guide_gradient
g_task, g_meta = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
guided = {lam: guide_gradient(g_task, g_meta, lam) for lam in (0.0, 0.5, 1.0)}
print({lam: g.tolist() for lam, g in guided.items()})
assert torch.equal(guided[0.0], g_task)                                  # λ = 0: unchanged
assert abs(float(guided[1.0] @ g_meta)) < 1e-6                           # λ = 1: orthogonal to the meta gradient
assert torch.equal(guide_gradient(g_task, torch.tensor([1.0, 1.0]), 1.0), g_task)   # no conflict: unchanged"""),
    ("code", """import plotly.graph_objects as go
fig = go.Figure()
arrows = {"g_task": g_task, "g_meta": g_meta, **{f"guided λ={lam}": g for lam, g in guided.items() if lam}}
for name, g in arrows.items():
    fig.add_trace(go.Scatter(x=[0, float(g[0])], y=[0, float(g[1])], mode="lines+markers+text", name=name,
                             text=["", name], textposition="top center"))
fig.update_layout(title="SMGS on two conflicting gradients", height=380, xaxis=dict(range=[-1.3, 1.3]),
                  yaxis=dict(range=[-0.3, 1.3], scaleanchor="x"))"""),
    ("md", """## A live training dashboard

`training_dashboard()` returns the widget and a callback; `tune_prompts` calls the callback after every step with
the step's record. Watch the losses, the share of parameter tensors where the gradients conflicted (where SMGS
acted), and the drift of the self-optimising meta-prompt."""),
    ("code", """data = session.dataset("brick")
shots = data.train.images(backbone.image_size, apt_lab.data.few_shot(data, k=session.k)).to(backbone.device)
dashboard, callback = widgets.training_dashboard(total_steps=config.train.steps)
dashboard"""),
    ("code", """with_smgs = apt_lab.tune_prompts(backbone, shots, config, callbacks=[callback], progress=False)
assert len(dashboard.history) == config.train.steps == len(with_smgs.history)
assert all(0.0 <= r["conflict_rate"] <= 1.0 for r in with_smgs.history)
drift = with_smgs.curve("meta_drift")
assert drift[-1] > drift[0] >= 0, "the EMA meta-prompt follows the learned prompts"
print(f"conflicts on {sum(r['conflict_rate'] for r in with_smgs.history) / len(drift):.0%} of parameter tensors per step; "
      f"meta drift {drift[-1]:.4f}")"""),
    ("md", """## With and without SMGS

Same shots, same seed: λ = 1 (APT) against λ = 0 (plain prompt tuning) and against a *static* meta-prompt (the
predecessor). With λ = 0 there is no meta gradient, so no conflicts are recorded; with a static meta-prompt
there is no drift."""),
    ("code", """plain = apt_lab.tune_prompts(backbone, shots, config.replace(smgs__lam=0.0), progress=False)
static = apt_lab.tune_prompts(backbone, shots, config.replace(smgs__update="static"), progress=False)
assert all(r["conflict_rate"] is None for r in plain.history)            # SMGS off
assert max(static.curve("meta_drift")) < 1e-6                              # the meta-prompt never moved
runs = {"APT (λ=1, ema)": with_smgs, "λ=0 (no SMGS)": plain, "λ=1, static meta": static}
fig = go.Figure()
for name, run in runs.items():
    fig.add_trace(go.Scatter(x=run.curve("step"), y=run.curve("meta_loss"), name=name, mode="lines"))
fig.update_layout(title="meta loss (distance from the meta-prompt's predictions)", xaxis_title="step", height=360)"""),
    ("md", """What to expect with real weights: without SMGS the meta loss grows as the prompts specialise on the
synthetic noise; with SMGS it stays lower, and the test-set gain shows up on real defects rather than on noise.
Notebook [05](05_benchmark.ipynb) runs that ablation on the test set."""),
    ("code", """plots.metrics_table_figure([{"run": name, "final loss": run.history[-1]["loss"],
                             "final meta loss": run.history[-1]["meta_loss"],
                             "final meta drift": run.history[-1]["meta_drift"], "seconds": run.timings["total_s"]}
                            for name, run in runs.items()])"""),
]

# ----------------------------------------------------------------------------------------------- 04 score
SCORE = opening("04_score", "04 · Score: anomaly maps, image scores, metrics and thresholds",
                "how maps and scores are computed and measured, why one colour range matters, and how to choose a "
                "threshold without looking at the test set.", "ViT-B-16 / openai, about 2 minutes") + [
    ("code", """data = session.dataset("brick")
shot_ids = apt_lab.data.few_shot(data, k=session.k)
shots = data.train.images(backbone.image_size, shot_ids).to(backbone.device)
tuned = apt_lab.tune_prompts(backbone, shots, config, progress=False)
test_images, masks, labels = data.test.images(backbone.image_size), data.test.masks(backbone.image_size), data.test.labels
scores = apt_lab.score(backbone, tuned.prompts, test_images, config)"""),
    ("md", """## Maps and scores

Per tapped layer, each patch gets softmax([cos to normal, cos to anomalous] / τ); the map is the mean over
layers, up-sampled and blurred. The image score is the same probability on the pooled image embedding. Both are
probabilities of "anomalous"."""),
    ("code", """maps = scores.anomaly_maps                                               # (T, S, S)
assert maps.shape == masks.shape and scores.image_scores.shape == labels.shape
assert 0 <= float(maps.min()) and float(maps.max()) <= 1
assert 0 <= float(scores.image_scores.min()) and float(scores.image_scores.max()) <= 1
results = apt_lab.metrics.evaluate(scores.image_scores, maps, labels, masks)
plots.metrics_table_figure([{"method": "APT (quick)" if session.quick else "APT", **results}])"""),
    ("md", """## One colour range, or one per image?

Left: one range for the whole set (the default everywhere in apt_lab). Right: each map stretched to its own
range — the normal images now look just as "hot" as the defective ones."""),
    ("code", """show = [i for i, d in enumerate(data.test.defects) if d == "good"][:2] + [i for i, d in enumerate(data.test.defects) if d != "good"][:2]
titles = [data.test.defects[i] for i in show]
display(plots.anomaly_map_grid(test_images[show], maps[show], masks[show], titles=titles))
plots.anomaly_map_grid(test_images[show], maps[show], masks[show], titles=titles, per_image_range=True)"""),
    ("md", """## Choosing a threshold without the test set

A deployed detector needs a threshold, and picking it on test labels is cheating. Instead: take the **normal
training images that were not shots** (held out), score them clean and perturbed with CFG, and choose

- the **pixel threshold** as the 99th percentile of the held-out *normal* map values (≈ 1 % false-alarm pixels);
- the **image threshold** as the value that best separates held-out normal from held-out perturbed scores (F1).

The test set is used only afterwards, to see how well that choice transfers."""),
    ("code", """held_out = [i for i in range(len(data.train)) if i not in shot_ids]          # normal, never used for tuning
normal = data.train.images(backbone.image_size, held_out).to(backbone.device)
perturbed = apt_lab.perturb(normal, config, torch.Generator().manual_seed(123), backbone=backbone)
normal_scores = apt_lab.score(backbone, tuned.prompts, normal, config)
perturbed_scores = apt_lab.score(backbone, tuned.prompts, perturbed.images, config)
pixel_threshold = float(torch.quantile(normal_scores.anomaly_maps.flatten(), 0.99))
candidates = torch.cat([normal_scores.image_scores, perturbed_scores.image_scores]).sort().values

def f1_at(threshold, negatives, positives):
    tp, fp = int((positives >= threshold).sum()), int((negatives >= threshold).sum())
    return 2 * tp / max(1, 2 * tp + fp + (len(positives) - tp))

image_threshold = max(candidates.tolist(), key=lambda t: f1_at(t, normal_scores.image_scores, perturbed_scores.image_scores))
test_f1 = f1_at(image_threshold, scores.image_scores[labels == 0], scores.image_scores[labels == 1])
print(f"held out: {len(held_out)} normal images (+ their perturbed copies); pixel threshold {pixel_threshold:.3f}, "
      f"image threshold {image_threshold:.3f}")
print(f"on the test set: image F1 at that threshold {test_f1:.3f} vs the oracle F1-max {results['image_f1max']:.3f}")
assert set(held_out).isdisjoint(shot_ids) and len(held_out) > 0
assert test_f1 <= results["image_f1max"] + 1e-9                             # the oracle is an upper bound"""),
    ("code", """plots.score_histogram_figure(scores.image_scores, labels, threshold=image_threshold,
                             title="test image scores (threshold chosen on held-out shots)")"""),
    ("md", """## Browse the maps

Pick an image, move the threshold (the magenta outline is map ≥ threshold; white is the truth), switch the colour
range, change the opacity. The info line gives the IoU of the thresholded map with the ground truth."""),
    ("code", """viewer = widgets.map_viewer(test_images, maps, masks, image_scores=scores.image_scores, labels=labels,
                            titles=data.test.defects, threshold=pixel_threshold)
viewer"""),
    ("code", """viewer.controls["image"].value = int(labels.argmax())                     # the first defective image
viewer.controls["colour_range"].value = "per image"
heat = next(t for t in viewer.figure.data if t.type == "heatmap")
assert heat.zmax == float(maps[int(labels.argmax())].max())
viewer.controls["colour_range"].value = "global"
viewer.info.value"""),
]

# ------------------------------------------------------------------------------------------- 05 benchmark
BENCH = opening("05_benchmark", "05 · Benchmark: baselines and ablations side by side",
                "how APT compares with human prompts, with plain prompt tuning (λ = 0) and with CFG without its "
                "region of interest — same data, same shots, same seeds — and how to run it on MVTec AD.",
                "ViT-B-16 / openai on the demo set in about 10 minutes; MVTec AD 15 categories × 3 seeds in about an "
                "hour") + [
    ("md", """## The variants

All four run through `apt_lab.pipeline.compare`: the same fixed few-shot draw, the same seeds, the same scoring
and metrics. Only the named knob changes."""),
    ("code", """from apt_lab.pipeline import compare

variants = {
    "human prompts": ("human", config),                                  # WinCLIP ensemble, zero-shot
    "λ = 0 (no SMGS)": ("apt", config.replace(smgs__lam=0.0)),             # plain prompt tuning
    "APT": ("apt", config),
    "APT, no region of interest": ("apt", config.replace(perturb__region="image")),
}
categories = ["brick"] if session.quick else session.categories()
seeds = (0,) if session.quick else (0, 1, 2)
print(f"{len(variants)} variants × {len(categories)} categories × {len(seeds)} seeds on {session.dataset_name}")"""),
    ("code", """rows = compare(backbone, session.dataset_name, categories, variants, seeds=seeds, k=session.k, root=session.data_root)
assert len(rows) == len(variants) * len(categories) * len(seeds)
assert {r["variant"] for r in rows} == set(variants)
metric_names = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"]
assert all(0.0 <= r[m] <= 1.0 for r in rows for m in metric_names)
plots.metrics_table_figure(rows, columns=["variant", "category", "seed", *metric_names, "tune_s"])"""),
    ("md", """## Charts

Bars are means over seeds with their standard deviation; the "mean" group is the macro mean over categories.
Pick a metric, or put the variants on the axis. (Quick mode: random weights, one category, one seed — the
numbers say nothing about APT; the harness is what is shown.)"""),
    ("code", """explorer = widgets.results_explorer(rows, metric="image_auroc")
explorer"""),
    ("code", "plots.metrics_bar_figure(rows, \"pixel_auroc\")"),
    ("md", """## The same on MVTec AD

1. Download once (about 5 GB): `apt-lab download mvtec ~/data/mvtec` (or `apt_lab.data.download("mvtec", root)`;
   see the *Data* page of the docs for licences and mirrors).
2. Point the notebooks at it and use a GPU:

   ```bash
   export APT_LAB_DATA=~/data          # the folder that holds mvtec/
   export APT_LAB_DATASET=mvtec
   export APT_LAB_PRESET=fast          # ViT-B-16 / openai; "paper" for ViT-L-14-336 at 518 px
   jupyter lab notebooks/05_benchmark.ipynb
   ```

   `setup()` then prints `data: mvtec at ...` and this notebook runs every category with seeds 0, 1, 2.
3. Or from the command line, one run folder per method with a resumable JSON and an HTML report:
   `apt-lab run --dataset mvtec --root ~/data/mvtec --preset fast --k 4 --seed 0`.

Report the evaluation resolution and the seeds with every table; never pick a step count or threshold on the
test set."""),
]

# ---------------------------------------------------------------------------------------- 06 perturbation
YOURS = opening("06_your_perturbation", "06 · Your perturbation: register a new anomaly generator",
                "how to add a new CFG scheme in one cell and compare it with the built-ins in the same harness.",
                "ViT-B-16 / openai, about 5 minutes") + [
    ("md", """## Register

A pixel-space generator is `fn(image (3, H, W), region (H, W) bool, rng, strength) -> (image, mask)`. It may
only change pixels inside `region`; `perturb` checks that and intersects the returned mask with the region.
Here: thin random line segments — closer to real scratches than blob-shaped noise."""),
    ("code", """@apt_lab.register_perturbation("lines", replace=True)      # replace=True: re-running the cell is fine
def random_lines(image, region, rng, strength):
    \"\"\"2-6 thin straight lines of one random brightness, each between two random pixels of the region.\"\"\"
    _, height, width = image.shape
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    inside_region = region.cpu().nonzero().float()                                     # (n, 2) allowed pixels
    mask = torch.zeros(height, width, dtype=torch.bool)
    count = int(torch.randint(2, 7, (), generator=rng))
    for _ in range(count):
        ends = inside_region[torch.randint(len(inside_region), (2,), generator=rng)]    # two (row, col) ends
        (y0, x0), (y1, x1) = ends.tolist()
        length = max(1.0, ((y1 - y0) ** 2 + (x1 - x0) ** 2) ** 0.5)
        distance = ((x1 - x0) * (y0 - rows) - (x0 - cols) * (y1 - y0)).abs() / length   # to the line
        inside = (cols - x0) * (x1 - x0) + (rows - y0) * (y1 - y0)                       # between the ends
        mask |= (distance < 1.0) & (inside >= 0) & (inside <= length ** 2)
    mask = (mask & region.cpu()).to(image.device)
    value = float(torch.rand((), generator=rng) < 0.5)                                   # black or white
    out = image.clone()
    out[:, mask] = (1 - strength) * image[:, mask] + strength * value
    return out, mask"""),
    ("code", """# NBVAL_CHECK_OUTPUT
print(apt_lab.list_perturbations("pixel"))"""),
    ("code", """data = session.dataset("brick")
shots = data.train.images(backbone.image_size, apt_lab.data.few_shot(data, k=session.k)).to(backbone.device)
lines_config = config.replace(perturb__generators=("lines",), perturb__region="image", perturb__strength=(0.8, 0.8))
out = apt_lab.perturb(shots, lines_config, torch.Generator().manual_seed(0), backbone=backbone)
assert out.generators == ["lines"] * len(shots)
changed = (out.images - shots).abs().amax(dim=1) > 0
assert changed.any() and not (changed & ~out.masks).any()
plots.perturbation_figure(shots[0], out.images[0], out.masks[0], title="the new 'lines' generator")"""),
    ("md", "It shows up in the explorer of notebook 01 next to the built-ins:"),
    ("code", """explorer = widgets.perturbation_explorer(backbone, shots, config)
explorer.controls["generator"].value = "lines"
assert explorer.last.generators == ["lines"]
explorer"""),
    ("md", """## Compare in the same harness

Same shots, seeds and scoring; only `config.perturb.generators` changes. The demo test set has scratches,
stains, pasted patches and holes, so the per-defect effect of a scheme can be read off later with the maps."""),
    ("code", """from apt_lab.pipeline import compare

variants = {
    "built-in noise": ("apt", config),
    "built-in + lines": ("apt", config.replace(perturb__generators=config.perturb.generators + ("lines",))),
    "lines only": ("apt", config.replace(perturb__generators=("lines",))),
}
categories = ["brick"] if session.quick else session.categories()
rows = compare(backbone, session.dataset_name, categories, variants, seeds=(0,), k=session.k, root=session.data_root)
assert [r["variant"] for r in rows] == list(variants) * len(categories)
plots.metrics_table_figure(rows, columns=["variant", "category", "image_auroc", "pixel_auroc", "aupro"])"""),
    ("code", "plots.metrics_bar_figure(rows, \"pixel_auroc\")"),
    ("md", """To make a scheme permanent, put the decorated function in a module that your code imports (or open a pull
request adding it to `apt_lab/perturbations.py`); nothing else in apt_lab needs to change."""),
]

# ------------------------------------------------------------------------------------------------ 07 data
DATA = opening("07_your_data", "07 · Your data: a folder of good and bad images",
               "how to run apt_lab on your own images with no particular layout beyond good/ and bad/ folders, and how "
               "to save and reload the tuned prompts.", "ViT-B-16 / openai, a minute or two per 100 images") + [
    ("md", """## The folder format

```
my_parts/
  good/     normal images (half are used for tuning shots, half for testing, unless a train/ folder exists)
  bad/      defective images (optional)
  masks/    optional pixel masks for bad images, named like the image (or <name>_mask.png)
```

Here we build such a folder in a temporary directory from the demo photos; replace `root` with your own path."""),
    ("code", """import shutil
import tempfile
from pathlib import Path

demo = apt_lab.data.load_dataset("demo", category="grass")
root = Path(tempfile.mkdtemp()) / "my_parts"
for sub in ("good", "bad", "masks"):
    (root / sub).mkdir(parents=True)
for path in demo.train.paths:
    shutil.copy(path, root / "good" / f"train_{Path(path).name}")
for path, mask, defect in zip(demo.test.paths, demo.test.mask_paths, demo.test.defects):
    if defect != "good":                                                  # unique names: <defect>_<number>
        shutil.copy(path, root / "bad" / f"{defect}_{Path(path).name}")
        shutil.copy(mask, root / "masks" / f"{defect}_{Path(path).name}")
print(sorted(p.name for p in root.iterdir()), len(list((root / "bad").iterdir())), "bad images")"""),
    ("code", """# NBVAL_CHECK_OUTPUT
mine = apt_lab.data.load_dataset("folder", root)
print(mine.category, "| train", len(mine.train), "| test", len(mine.test), "| anomalous", int(mine.test.labels.sum()))
assert len(mine.train) > 0 and int(mine.test.labels.sum()) == len(list((root / "bad").iterdir()))"""),
    ("md", "## Run APT on it"),
    ("code", """from apt_lab.pipeline import run_category

result = run_category(backbone, mine, config, k=session.k, seed=0)
assert result.anomaly_maps.shape == (len(mine.test), backbone.image_size, backbone.image_size)
plots.metrics_table_figure([{"data": str(root.name), **result.metrics, **result.timings}])"""),
    ("code", """test_images = mine.test.images(backbone.image_size)
viewer = widgets.map_viewer(test_images, result.anomaly_maps, result.masks, image_scores=result.image_scores,
                            labels=result.labels, titles=[Path(p).stem for p in result.paths])
viewer"""),
    ("md", """## Save the prompts, reload them later

The tuned prompts are a few kilobytes: `save_prompts` writes `<path>.safetensors` and `<path>.json` (config,
backbone, shots); `load_prompts` rebuilds them on the same backbone and scores identically."""),
    ("code", """path = root.parent / "prompts" / "my_parts"
apt_lab.save_prompts(result.tuned, path, config=config, extra={"shots": result.shots})
reloaded = apt_lab.load_prompts(path, backbone)
again = apt_lab.score(backbone, reloaded, test_images[:4], config)
assert torch.allclose(again.image_scores, result.image_scores[:4], atol=1e-5)
sorted(p.name for p in path.parent.iterdir())"""),
    ("code", "shutil.rmtree(root.parent)   # tidy up the temporary folder"),
]

NOTEBOOKS = {
    "00_tour": TOUR, "01_perturb": PERTURB, "02_prompts": PROMPTS, "03_smgs": SMGS, "04_score": SCORE,
    "05_benchmark": BENCH, "06_your_perturbation": YOURS, "07_your_data": DATA,
}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "colab": {"provenance": []}, "accelerator": "GPU"}
    for index, (kind, source) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell["id"] = f"cell-{index:02d}"  # stable ids: regenerating gives byte-identical files
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed notebook is out of date")
    args = parser.parse_args(argv)
    NOTEBOOK_DIR.mkdir(exist_ok=True)
    stale = []
    for name, cells in NOTEBOOKS.items():
        text = nbformat.writes(build(cells)) + "\n"
        path = NOTEBOOK_DIR / f"{name}.ipynb"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python scripts/make_notebooks.py):", ", ".join(stale), file=sys.stderr)
        return 1
    if not args.check:
        print(f"wrote {len(NOTEBOOKS)} notebooks to {NOTEBOOK_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
