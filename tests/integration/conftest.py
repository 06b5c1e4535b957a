import pytest

from ml_core.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def synth_det_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_worker")
    generate(out, SynthConfig(kind="detection", image_size=64, labeled=6, unlabeled=6, val=6, seed=21))
    return out
