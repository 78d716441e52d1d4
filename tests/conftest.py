from pathlib import Path

import pytest

from twotower.config import RunConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
ML100K = SHARED / "data" / "ml-100k"


def tiny_config(**train) -> RunConfig:
    """A synthetic run that trains in about a second: ids plus side features on both towers."""
    return RunConfig.model_validate(
        {
            "data": {"source": "synthetic", "world": {"num_users": 300, "num_items": 150, "seed": 1}},
            "features": {
                "user": [{"type": "id", "name": "user_id"}, {"type": "categorical", "name": "segment"}],
                "item": [{"type": "id", "name": "item_id"}, {"type": "multi_hot", "name": "genres"}],
            },
            "model": {
                "temperature": 0.1,
                "user_tower": {"embedding_dim": 16, "layers": [32, 16], "dropout": 0.1},
                "item_tower": {"embedding_dim": 16, "layers": [32, 16], "dropout": 0.1},
            },
            "task": {"logq": "streaming"},
            "train": {"epochs": 3, "batch_size": 256, "lr": 0.01, "seed": 3, **train},
            "eval": {"protocol": "temporal"},
        }
    )


def train_small_run(out: Path, world_seed: int) -> Path:
    """Train a 150-user x 90-item synthetic run (small towers, temporal split) into ``out``: a few
    seconds, for tests that need a trained run directory rather than a particular model."""
    from twotower.experiment import train_run

    config = RunConfig.model_validate(
        {
            "data": {"source": "synthetic", "world": {"num_users": 150, "num_items": 90, "seed": world_seed}},
            "model": {"temperature": 0.1, "user_tower": {"layers": [16]}, "item_tower": {"layers": [16]}},
            "train": {"epochs": 3, "batch_size": 128, "lr": 0.01, "seed": 0},
            "eval": {"protocol": "temporal", "ks": [10]},
        }
    )
    train_run(config, out, progress=False)
    return out


@pytest.fixture
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (the shared data folder beside the repo)")
    return ML100K


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one intra-op thread: on a busy 2-core machine a second costs up to
    10x. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
