import pytest

from ml_core.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def det_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("det")
    generate(out, SynthConfig(kind="detection", image_size=64, labeled=8, unlabeled=6, val=4, seed=3))
    return out


@pytest.fixture(scope="session")
def kp_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("kp")
    generate(out, SynthConfig(kind="keypoints", image_size=64, labeled=6, unlabeled=4, val=4, seed=3))
    return out
