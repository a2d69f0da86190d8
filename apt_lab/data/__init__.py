"""Datasets for apt_lab: benchmark readers, a bundled real-photo demo set, few-shot draws, downloads.

    >>> from apt_lab.data import load_dataset, few_shot
    >>> ds = load_dataset("demo", category="brick")       # lists files only; pixels read lazily
    >>> shots = ds.train.images(224, few_shot(ds, k=2))    # (2, 3, 224, 224) float32 in [0, 1]
    >>> masks = ds.test.masks(224)                         # (N, 224, 224) bool

Listing a dataset never imports torch; reading pixels does. See docs/data.md for layouts, downloads and the
few-shot procedure.
"""
from .download import download
from .draws import few_shot
from .images import resize_images, resize_masks
from .readers import Dataset, Item, Split, dataset_root, list_categories, load_dataset

__all__ = ["load_dataset", "list_categories", "dataset_root", "few_shot", "download", "resize_images",
           "resize_masks", "Item", "Split", "Dataset"]
