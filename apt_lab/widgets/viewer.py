"""``map_viewer``: anomaly maps image by image, with a threshold, a colour-range choice and the overlay opacity."""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from .. import plots
from ..plots import to_numpy
from ._view import PlotWidget


class MapViewer(PlotWidget):
    """Controls ``image`` (picker), ``threshold`` (outlines map ≥ threshold), ``colour_range`` ("global": one
    range for the whole set, the honest default; "per image": each map stretched to its own range) and
    ``opacity`` of the map over the image. The info line gives the image score, label, and — with masks — the
    IoU of the thresholded map with the ground truth (on normal images, whose mask is empty, the share of false
    alarms instead: IoU is undefined there).
    """

    def __init__(self, images, anomaly_maps, masks=None, image_scores=None, labels=None, titles=None,
                 threshold: float | None = None, backend: str | None = None):
        self.images = images
        self.maps = to_numpy(anomaly_maps).astype(np.float32)  # (B, H, W)
        self.masks = None if masks is None else to_numpy(masks).astype(bool)  # (B, H, W)
        self.image_scores = None if image_scores is None else to_numpy(image_scores).astype(np.float64)
        self.labels = None if labels is None else to_numpy(labels).astype(int)
        count = len(self.maps)
        if len(images) != count or (self.masks is not None and len(self.masks) != count):
            raise ValueError(f"map_viewer: {len(images)} images and {count} maps"
                             + ("" if self.masks is None else f" and {len(self.masks)} masks")
                             + "; pass one map (and mask) per image")
        self.global_range = plots.map_range([self.maps])
        low, high = self.global_range
        step = (high - low) / 200
        start = float(np.clip(threshold if threshold is not None else np.quantile(self.maps, 0.99), low, high))
        self.titles = list(titles) if titles is not None else None
        options = [(self._label(i), i) for i in range(count)]
        longest = max(len(label) for label, _ in options)  # the select is as wide as its longest label: none is cut
        controls = {
            "image": widgets.Dropdown(options=options, value=0, description="image",
                                      layout=widgets.Layout(width=f"calc({longest + 3}ch + 90px)", max_width="100%")),
            "threshold": widgets.FloatSlider(value=start, min=low, max=high, step=step, readout_format=".3f",
                                             description="threshold", continuous_update=False),
            "colour_range": widgets.ToggleButtons(options=["global", "per image"], value="global",
                                                  description="colours", style={"button_width": "90px", "description_width": "80px"},
                                                  # the label on the line of its buttons (ipywidgets 8 stacks them)
                                                  layout=widgets.Layout(display="flex", flex_flow="row nowrap",
                                                                        align_items="center")),
            "opacity": widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="opacity",
                                           continuous_update=False),
        }
        super().__init__(controls, backend, columns=2)
        self.render()

    def _label(self, index: int) -> str:
        parts = [f"#{index}" + (f" {self.titles[index]}" if self.titles is not None else "")]
        if self.labels is not None:
            parts.append("anomalous" if self.labels[index] else "normal")
        if self.image_scores is not None:
            parts.append(f"score {self.image_scores[index]:.3f}")
        return " · ".join(parts)

    def build_figure(self) -> go.Figure:
        c = {name: control.value for name, control in self.controls.items()}
        index, threshold = int(c["image"]), float(c["threshold"])
        anomaly_map = self.maps[index]
        zmin, zmax = self.global_range if c["colour_range"] == "global" else plots.map_range([anomaly_map])
        mask = self.masks[index] if self.masks is not None else None
        predicted = anomaly_map >= threshold
        info = [f"<b>{self._label(index)}</b>", f"map ≥ threshold on {predicted.mean():.1%} of pixels"]
        if mask is not None and mask.any():
            iou = (mask & predicted).sum() / (mask | predicted).sum()
            info.append(f"IoU with the ground truth {iou:.1%}")
        elif mask is not None:  # IoU is undefined without a true region: every flagged pixel is a false alarm
            flagged = int(predicted.sum())
            info.append("no defect in the ground truth: " + (f"the {flagged} flagged pixels are false alarms" if flagged
                                                             else "nothing flagged, as it should be"))
        info.append(f"colour range [{zmin:.3f}, {zmax:.3f}] ({c['colour_range']})")
        self.info.value = "; ".join(info)
        return plots.anomaly_map_figure(self.images[index], anomaly_map, mask=mask, zmin=zmin, zmax=zmax,
                                        opacity=float(c["opacity"]), threshold=threshold,
                                        title=self._label(index))


def map_viewer(images, anomaly_maps, masks=None, image_scores=None, labels=None, titles=None,
               threshold: float | None = None, backend: str | None = None) -> MapViewer:
    """Browse anomaly maps over their images.

    Args:
        images: (B, 3, H, W) pixels in [0, 1].
        anomaly_maps: (B, H, W).
        masks: (B, H, W) bool ground truth, or None.
        image_scores: (B,) or None.
        labels: (B,) 0 normal / 1 anomalous, or None.
        titles: B strings (e.g. defect names), or None.
        threshold: starting threshold (choose it without the test set, e.g. from held-out perturbed shots);
            None = the 99th percentile of all map values.
        backend: "figurewidget", "output" (core ipywidgets only, for Colab) or None (automatic).

    Returns:
        a displayable widget; ``.controls`` (image, threshold, colour_range, opacity), ``.figure``, ``.render()``.
    """
    return MapViewer(images, anomaly_maps, masks=masks, image_scores=image_scores, labels=labels, titles=titles,
                     threshold=threshold, backend=backend)
