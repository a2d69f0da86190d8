"""Shared test setup: offline hub, deterministic CPU torch, one tiny backbone per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing weight fails at once, never after retries
os.environ.setdefault("APT_LAB_QUICK", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_backbone():
    """apt-tiny with random weights (seeded), shared by every test that only reads it."""
    import apt_lab

    torch.manual_seed(0)
    return apt_lab.load_backbone("apt-tiny", device="cpu")


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    """Once-per-process notices (random weights, skipped pixel metrics) start unannounced in every test."""
    import apt_lab.backbone
    import apt_lab.metrics

    monkeypatch.setattr(apt_lab.metrics, "SKIP_NOTICES", set())
    monkeypatch.setattr(apt_lab.backbone, "ANNOUNCED", set())
