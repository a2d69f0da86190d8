"""``perturbation_explorer``: CFG live — generator, strength, region of interest and seed redraw image and mask."""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import torch

from .. import plots
from ._view import PlotWidget


class PerturbationExplorer(PlotWidget):
    """Controls ``image``, ``generator``, ``strength``, ``region`` (region of interest on/off) and ``seed`` over
    three panels: the normal image with its region of interest, the perturbed image, and the anomaly mask.

    Attributes:
        last: the latest ``apt_lab.perturbations.Perturbation`` (one image).
    """

    def __init__(self, backbone, images: torch.Tensor, config, backend: str | None = None,
                 generators: list[str] | None = None):
        from ..perturbations import list_perturbations

        self.backbone, self.config = backbone, config
        self.images = backbone.load_images(images) if backbone is not None else images  # (B, 3, S, S)
        names = generators or list_perturbations("pixel")  # feature-space schemes change tokens, not pixels
        low, high = config.perturb.strength
        style = {"description_width": "initial"}
        controls = {
            "image": widgets.IntSlider(0, 0, max(0, len(self.images) - 1), description="image",
                                       continuous_update=False, disabled=len(self.images) < 2),
            "generator": widgets.Dropdown(options=names, value=names[0], description="generator"),
            "strength": widgets.FloatSlider(value=round((low + high) / 2, 2), min=0.0, max=1.0, step=0.05,
                                            description="strength", continuous_update=False),
            "region": widgets.Checkbox(value=config.perturb.region == "roi", description="region of interest",
                                       style=style),
            "seed": widgets.IntSlider(0, 0, 99, description="seed", continuous_update=False),
        }
        self._roi: dict[int, torch.Tensor] = {}  # image index → (1, S, S) ROI, computed once per image
        self.last = None
        super().__init__(controls, backend)
        self.render()

    def roi(self, index: int) -> torch.Tensor:
        """(1, S, S) bool region of interest of image ``index`` (cached: one encoder pass per image)."""
        if index not in self._roi:
            from ..perturbations import region_of_interest

            config = self.config.replace(perturb__region="roi")
            self._roi[index] = region_of_interest(self.backbone, self.images[index:index + 1], config)
        return self._roi[index]

    def build_figure(self) -> go.Figure:
        from ..perturbations import perturb

        c = {name: control.value for name, control in self.controls.items()}
        strength = float(c["strength"])
        config = self.config.replace(perturb__generators=(c["generator"],), perturb__strength=(strength, strength),
                                     perturb__region="roi" if c["region"] else "image")
        image = self.images[c["image"]:c["image"] + 1]  # (1, 3, S, S)
        roi = self.roi(c["image"]) if c["region"] else None
        rng = torch.Generator().manual_seed(int(c["seed"]))
        self.last = out = perturb(image, config, rng, roi=roi, backbone=self.backbone)
        area = float(out.masks[0].float().mean())
        changed = float((out.images[0] - image[0]).abs().amax(0).gt(1e-6).float().mean())
        if roi is None:
            region = "region of interest off: the blob may fall anywhere"
        elif bool(roi.all()):
            region = "region of interest: the whole image (foreground too large: a texture)"
        else:
            region = f"region of interest: {float(roi.float().mean()):.0%} of the image"
        shape = "region of interest ∩ random blob" if roi is not None else "random blob"
        self.info.value = (f"<b>{c['generator']}</b>, strength {strength:.2f}, seed {c['seed']}: the mask covers "
                           f"{area:.1%} of the image (mask = {shape}); {region}; pixels changed {changed:.1%}; "
                           f"anomalous patches {int(out.patch_masks[0].sum())} of {out.patch_masks[0].numel()}")
        title = f"{c['generator']} · strength {strength:.2f} · seed {c['seed']}"
        return plots.perturbation_figure(image[0], out.images[0], out.masks[0],
                                         roi=roi[0] if roi is not None else None, title=title)


def perturbation_explorer(backbone, images: torch.Tensor, config, backend: str | None = None,
                          generators: list[str] | None = None) -> PerturbationExplorer:
    """A live view of CFG on a few normal images.

    Args:
        backbone: the frozen model (finds the region of interest and the patch grid).
        images: (B, 3, S, S) normal images in [0, 1].
        config: an ``APTConfig``; its ``perturb`` section sets everything but the controlled knobs.
        backend: "figurewidget", "output" (core ipywidgets only, for Colab) or None (automatic).
        generators: names offered in the dropdown; default every registered pixel-space scheme.

    Returns:
        a displayable widget; ``.controls`` (image, generator, strength, region, seed), ``.figure``, ``.render()``.
    """
    return PerturbationExplorer(backbone, images, config, backend=backend, generators=generators)
