"""Shared fixtures: a small built-in synthetic video set, generated once per pytest run."""
import pytest

from synthetic import synthetic_dataset


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """16 train / 8 val synthetic videos (64x64, 16 frames; 2 with DAVIS-layout masks)."""
    return synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", seed=0,
                             num_train=16, num_val=8, num_frames=16, size=64, num_vos=2)
