import json

import pytest
import torch

from conftest import tiny_config
from twotower.data.dataset import build_retrieval_data
from twotower.experiment import train_run
from twotower.storage import load_tensors


@pytest.fixture(scope="module")
def data():
    return build_retrieval_data(tiny_config())


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, data):
    full = train_run(tiny_config(epochs=4), tmp_path / "full", progress=False, data=data)
    # Interrupted after epoch 2 (a run configured for 2 epochs), then resumed to 4.
    train_run(tiny_config(epochs=2), tmp_path / "cut", progress=False, data=data)
    resumed = train_run(tiny_config(epochs=4), tmp_path / "cut", resume=True, progress=False, data=data)
    a = load_tensors(tmp_path / "full" / "model.safetensors")
    b = load_tensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # dropout, the streaming estimator and AdamW state all continue exactly
        assert torch.equal(a[key], b[key]), key
    assert resumed["recall@10"] == full["recall@10"] and resumed["ndcg@10"] == full["ndcg@10"]
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_run_directory_holds_config_checkpoints_and_metrics(tmp_path, data):
    train_run(tiny_config(epochs=2), tmp_path, progress=False, data=data)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.yaml",
        "checkpoints",
        "metrics.json",
        "model.safetensors",
        "model.json",
        "history.json",
    } <= names
    ckpt = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert ckpt == {"last.json", "last-epoch0002.safetensors"}  # older epochs are replaced
    assert not any(n.endswith(".tmp") for n in names | ckpt)
    assert not any(p.suffix in (".pt", ".pkl", ".pth") for p in tmp_path.rglob("*"))


def test_early_stopping_restores_the_best_epoch(tmp_path, data):
    cfg = tiny_config(epochs=30, lr=0.05, early_stopping={"metric": "recall@10", "patience": 2})
    metrics = train_run(cfg, tmp_path, progress=False, data=data)
    history = json.loads((tmp_path / "history.json").read_text())
    best = max(history, key=lambda h: h["valid_recall@10"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["epochs_run"] < 30  # it stopped
    assert metrics["epochs_run"] - metrics["best_epoch"] == 2


def test_diverging_loss_is_reported(tmp_path, data):
    from twotower.experiment import build_model
    from twotower.train import fit

    cfg = tiny_config()
    model = build_model(cfg, data)

    def batches(epoch):
        yield {
            "user_idx": torch.tensor([0, 1]),
            "item_idx": torch.tensor([0, 1]),
            "weight": torch.tensor([float("nan"), 1.0]),
        }

    with pytest.raises(FloatingPointError, match="epoch 1"):
        fit(model, batches, cfg.train, tmp_path, progress=False)


# --- fit() on a toy model: milliseconds per run, so the edge cases can each train several times --------


class _Toy(torch.nn.Module):
    """Linear regression behind dropout (the torch RNG matters) with a buffer updated every step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.5)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def compute_loss(self, batch):
        self.seen += len(batch["x"])
        return ((self.lin(self.drop(batch["x"])).squeeze(1) - batch["y"]) ** 2).mean()


_X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
_Y = _X @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def _toy_batches(epoch):
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
    for i in range(0, 64, 16):
        yield {"x": _X[perm[i : i + 16]], "y": _Y[perm[i : i + 16]]}


def _toy(seed=0):
    torch.manual_seed(seed)
    return _Toy()


def _scripted(model, values, snapshots=None):
    """A validate callback returning the given metric values in turn (and snapshotting the weights)."""
    values = iter(values)

    def validate():
        if snapshots is not None:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"m": next(values)}

    return validate


def _toy_config(epochs, **kw):
    from twotower.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=16, **kw)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_early_stopping_returns_the_best_epochs_weights_not_the_last(tmp_path):
    from twotower.train import fit

    model, snaps = _toy(), []
    cfg = _toy_config(8, early_stopping={"metric": "m", "patience": 2})
    result = fit(
        model, _toy_batches, cfg, tmp_path, _scripted(model, [0.1, 0.5, 0.3, 0.2, 0.9], snaps), False, False
    )
    assert (result.best_epoch, result.best_metric, result.epochs_run) == (2, 0.5, 4)
    for key, value in model.state_dict().items():  # buffers too: the weights as validated after epoch 2
        assert torch.equal(value, snaps[1][key]), key
    assert not torch.equal(model.state_dict()["lin.weight"], snaps[3]["lin.weight"])


def test_resume_with_early_stopping_matches_an_uninterrupted_run(tmp_path):
    from twotower.train import fit

    values = [0.1, 0.5, 0.3, 0.6, 0.2, 0.1, 0.0, 0.0]
    cfg = _toy_config(8, early_stopping={"metric": "m", "patience": 3})
    full = _toy()
    want = fit(full, _toy_batches, cfg, tmp_path / "full", _scripted(full, values), progress=False)
    cut = _toy()
    fit(
        cut,
        _toy_batches,
        cfg.model_copy(update={"epochs": 3}),
        tmp_path / "cut",
        _scripted(cut, values),
        progress=False,
    )
    resumed = _toy(seed=123)  # other initial weights and RNG state: all of it must come from the checkpoint
    got = fit(
        resumed,
        _toy_batches,
        cfg,
        tmp_path / "cut",
        _scripted(resumed, values[3:]),
        resume=True,
        progress=False,
    )
    assert (got.best_epoch, got.best_metric, got.epochs_run) == (want.best_epoch, want.best_metric, 7)
    assert want.epochs_run == 7 and [h["valid_m"] for h in got.history] == values[:7]
    _assert_same_weights(full, resumed)


def test_resume_after_a_crash_between_tensors_and_json_is_exact(tmp_path):
    """A crash after epoch 3's tensors file is written but before last.json: resume redoes epoch 3."""
    from twotower.train import fit

    full = _toy()
    fit(full, _toy_batches, _toy_config(4, optimizer="adagrad"), tmp_path / "full", progress=False)
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    fit(_toy(), _toy_batches, _toy_config(2, optimizer="adagrad"), run, progress=False)
    committed = {p.name: p.read_bytes() for p in ckpt.iterdir()}  # last.json + last-epoch0002.safetensors
    fit(_toy(), _toy_batches, _toy_config(3, optimizer="adagrad"), run, resume=True, progress=False)
    for name, data in committed.items():  # on disk as the crash left it: epoch 3's tensors, epoch 2's JSON
        (ckpt / name).write_bytes(data)
    assert len(list(ckpt.iterdir())) == 3
    (ckpt / ".last-epoch0003.safetensors.k2j4x.tmp").write_bytes(b"half a write")  # killed mid-write
    resumed = _toy(seed=7)
    result = fit(resumed, _toy_batches, _toy_config(4, optimizer="adagrad"), run, resume=True, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    _assert_same_weights(full, resumed)
    assert sorted(p.name for p in ckpt.iterdir()) == ["last-epoch0004.safetensors", "last.json"]


def test_resuming_a_finished_run_trains_no_further(tmp_path):
    from twotower.train import fit

    done = _toy()
    fit(done, _toy_batches, _toy_config(2), tmp_path, progress=False)
    again = _toy(seed=5)
    result = fit(again, _toy_batches, _toy_config(2), tmp_path, resume=True, progress=False)
    assert result.epochs_run == 2 and [h["epoch"] for h in result.history] == [1, 2]
    _assert_same_weights(done, again)


def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path):
    from twotower.train import fit

    fit(_toy(), _toy_batches, _toy_config(1), tmp_path, progress=False)
    tensors, meta = (
        tmp_path / "checkpoints" / "last-epoch0001.safetensors",
        tmp_path / "checkpoints" / "last.json",
    )
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*last-epoch0001\.safetensors is unreadable"):
        fit(_toy(), _toy_batches, _toy_config(2), tmp_path, resume=True, progress=False)
    tensors.unlink()
    with pytest.raises(FileNotFoundError, match="last-epoch0001.safetensors"):
        fit(_toy(), _toy_batches, _toy_config(2), tmp_path, resume=True, progress=False)
    tensors.write_bytes(data)
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=r"checkpoint .*last\.json is unreadable .*train without resume"):
        fit(_toy(), _toy_batches, _toy_config(2), tmp_path, resume=True, progress=False)


def test_resume_uses_the_configured_learning_rate_not_the_checkpoints(tmp_path):
    from twotower.train import fit

    fit(_toy(), _toy_batches, _toy_config(1, lr=0.01, weight_decay=0.1), tmp_path, progress=False)
    changed = _toy_config(2, lr=0.002, weight_decay=0.0)
    fit(_toy(), _toy_batches, changed, tmp_path, resume=True, progress=False)
    groups = json.loads((tmp_path / "checkpoints" / "last.json").read_text())["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.002, 0.0)]


def test_a_nan_validation_metric_is_never_the_best_and_does_not_freeze_early_stopping(tmp_path):
    """compute_metrics gives NaN when no user can be evaluated; `value > nan` is always False, so a
    NaN taken as the best would stop training at patience and restore that epoch's weights."""
    from twotower.train import fit

    model, snaps = _toy(), []
    cfg = _toy_config(5, early_stopping={"metric": "m", "patience": 2})
    values = [float("nan"), 0.5, 0.6, 0.7, 0.8]
    result = fit(model, _toy_batches, cfg, tmp_path, _scripted(model, values, snaps), progress=False)
    assert (result.best_epoch, result.best_metric, result.epochs_run) == (5, 0.8, 5)
    for key, value in model.state_dict().items():  # epoch 5's weights, not epoch 1's
        assert torch.equal(value, snaps[4][key]), key


def test_a_nan_best_metric_in_a_checkpoint_gives_way_to_the_first_finite_value(tmp_path):
    from twotower.train import fit

    cfg = _toy_config(1, early_stopping={"metric": "m", "patience": 2})
    fit(_toy(), _toy_batches, cfg, tmp_path, _scripted(None, [0.1]), progress=False)
    meta = tmp_path / "checkpoints" / "last.json"  # as an older version could have saved it:
    meta.write_text(meta.read_text().replace('"best_metric": 0.1', '"best_metric": NaN'))
    more = cfg.model_copy(update={"epochs": 2})
    result = fit(_toy(), _toy_batches, more, tmp_path, _scripted(None, [0.05]), resume=True, progress=False)
    assert (result.best_epoch, result.best_metric, result.epochs_run) == (2, 0.05, 2)


def test_epochs_with_a_nan_validation_metric_count_towards_patience(tmp_path):
    from twotower.train import fit

    model = _toy()
    cfg = _toy_config(8, early_stopping={"metric": "m", "patience": 2})
    nan = float("nan")
    result = fit(model, _toy_batches, cfg, tmp_path, _scripted(model, [0.3, nan, 0.2, 0.9]), progress=False)
    assert (result.best_epoch, result.best_metric, result.epochs_run) == (1, 0.3, 3)


def test_resuming_into_another_architecture_is_refused(tmp_path):
    from twotower.train import fit

    fit(_toy(), _toy_batches, _toy_config(1), tmp_path, progress=False)
    wider = _toy()
    wider.lin = torch.nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="size mismatch for lin.weight"):
        fit(wider, _toy_batches, _toy_config(2), tmp_path, resume=True, progress=False)


def test_unknown_early_stopping_metric_names_the_known_ones(tmp_path):
    from twotower.train import fit

    model = _toy()
    cfg = _toy_config(3, early_stopping={"metric": "ndcg@10", "patience": 1})
    with pytest.raises(KeyError, match="ndcg@10.*valid_m"):
        fit(model, _toy_batches, cfg, tmp_path, _scripted(model, [0.1, 0.2, 0.3]), progress=False)


def test_progress_prints_one_line_per_epoch_and_nothing_when_off(tmp_path, capsys):
    from twotower.train import fit

    model = _toy()
    fit(model, _toy_batches, _toy_config(2), tmp_path / "on", _scripted(model, [0.25, 0.5]), progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2: loss=") and "valid_m=0.5" in lines[1]
    fit(_toy(), _toy_batches, _toy_config(2), tmp_path / "off", progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def _two_metrics(values):
    values = iter(values)
    return lambda: dict(zip(("m", "n"), next(values), strict=True))


def test_resuming_with_another_early_stopping_metric_forgets_the_old_best(tmp_path):
    from twotower.train import fit

    watch_m = _toy_config(2, early_stopping={"metric": "m", "patience": 3})
    fit(_toy(), _toy_batches, watch_m, tmp_path, _two_metrics([(0.9, 0.0), (0.8, 0.0)]), progress=False)
    watch_n = _toy_config(4, early_stopping={"metric": "n", "patience": 3})
    got = fit(_toy(), _toy_batches, watch_n, tmp_path, _two_metrics([(0.0, 0.1), (0.0, 0.2)]), resume=True,
              progress=False)  # fmt: skip
    # n = 0.2 at epoch 4 is the best n; it used to lose to m's 0.9 and restore epoch 1's weights
    assert (got.best_epoch, got.best_metric, got.epochs_run) == (4, 0.2, 4)


def test_a_stopped_run_resumed_without_early_stopping_or_with_more_patience_trains_on(tmp_path):
    from twotower.train import fit

    cfg = _toy_config(8, early_stopping={"metric": "m", "patience": 1})
    assert (
        fit(_toy(), _toy_batches, cfg, tmp_path, _scripted(None, [0.5, 0.1]), progress=False).epochs_run == 2
    )
    same = fit(_toy(), _toy_batches, cfg, tmp_path, _scripted(None, []), resume=True, progress=False)
    assert (same.epochs_run, same.best_epoch) == (2, 1)  # finished: nothing more to train
    patient = _toy_config(3, early_stopping={"metric": "m", "patience": 3})
    more = fit(_toy(), _toy_batches, patient, tmp_path, _scripted(None, [0.7]), resume=True, progress=False)
    assert (more.epochs_run, more.best_epoch, more.best_metric) == (3, 3, 0.7)
    off = fit(_toy(), _toy_batches, _toy_config(5), tmp_path, resume=True, progress=False)
    # the last epoch's weights are returned: no best epoch describes them (it said 3, from the checkpoint)
    assert (off.epochs_run, off.best_epoch, off.best_metric) == (5, None, None)


def test_an_epoch_without_any_batch_is_an_error_not_a_zero_loss(tmp_path):
    from twotower.train import fit

    with pytest.raises(ValueError, match="epoch 1 produced no training batch"):
        fit(_toy(), lambda epoch: iter(()), _toy_config(2), tmp_path, progress=False)


def test_a_crash_after_a_new_best_but_before_its_checkpoint_keeps_the_committed_best(tmp_path, monkeypatch):
    """Epoch 3 improves and its best weights are written, then the run dies before epoch 3's
    last.json: the committed checkpoint's best (epoch 2) must keep its weights, whatever the redone
    epoch 3 scores (the same on a deterministic CPU run, not always on a GPU)."""
    import twotower.train as train

    cfg = _toy_config(3, early_stopping={"metric": "m", "patience": 3})
    write_json, writes = train.write_json, []

    def die_at_the_third_commit(path, obj, **kw):
        writes.append(path)
        if len(writes) == 3:
            raise KeyboardInterrupt
        write_json(path, obj, **kw)

    monkeypatch.setattr(train, "write_json", die_at_the_third_commit)
    model, snaps = _toy(), []
    with pytest.raises(KeyboardInterrupt):
        train.fit(
            model, _toy_batches, cfg, tmp_path, _scripted(model, [0.1, 0.5, 0.9], snaps), progress=False
        )
    monkeypatch.setattr(train, "write_json", write_json)
    resumed = _toy(seed=4)
    got = train.fit(resumed, _toy_batches, cfg, tmp_path, _scripted(None, [0.2]), resume=True, progress=False)
    assert (got.best_epoch, got.best_metric, got.epochs_run) == (2, 0.5, 3)
    for key, value in resumed.state_dict().items():  # epoch 2's weights, not the uncommitted epoch 3's
        assert torch.equal(value, snaps[1][key]), key
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best-epoch0002.safetensors", "last-epoch0003.safetensors", "last.json"]


def test_a_fresh_run_interrupted_before_its_first_checkpoint_never_resumes_the_previous_run(tmp_path):
    from twotower.train import fit

    fit(_toy(seed=9), _toy_batches, _toy_config(3, lr=0.05), tmp_path, progress=False)  # another run

    def interrupted(epoch):
        yield next(_toy_batches(epoch))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # training anew into the directory, stopped in epoch 1
        fit(_toy(), interrupted, _toy_config(3), tmp_path, progress=False)
    resumed = _toy()
    result = fit(resumed, _toy_batches, _toy_config(3), tmp_path, resume=True, progress=False)
    fresh = _toy()  # the resume starts from scratch: it used to continue the other run's checkpoint
    fit(fresh, _toy_batches, _toy_config(3), tmp_path / "fresh", progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    _assert_same_weights(fresh, resumed)


def test_an_error_in_a_step_stops_the_prefetch_thread_at_once(tmp_path, capsys):
    import threading

    from twotower.data.prefetch import prefetched
    from twotower.train import fit

    class FailsAtStep2(_Toy):
        steps = 0

        def compute_loss(self, batch):
            self.steps += 1
            if self.steps == 2:
                raise RuntimeError("step 2 failed")
            return super().compute_loss(batch)

    torch.manual_seed(0)
    model = FailsAtStep2()
    with pytest.raises(RuntimeError, match="step 2 failed") as failure:  # with a progress bar shown: its
        # iterator closes the one it wraps only when the bar is off
        fit(model, prefetched(_toy_batches, depth=1), _toy_config(2), tmp_path, progress=True)
    # The traceback, which holds fit's frames, is still alive (a caller logging it, a notebook's last
    # error): the producer must not wait for it to be collected, polling its full queue meanwhile.
    assert failure.traceback
    assert not [t for t in threading.enumerate() if t.name == "twotower-prefetch" and t.is_alive()]


def test_a_checkpoint_with_the_older_single_best_file_still_restores_its_best(tmp_path):
    from twotower.train import fit

    cfg = _toy_config(2, early_stopping={"metric": "m", "patience": 3})
    model, snaps = _toy(), []
    fit(model, _toy_batches, cfg, tmp_path, _scripted(model, [0.5, 0.1], snaps), progress=False)
    ckpt = tmp_path / "checkpoints"
    (ckpt / "best-epoch0001.safetensors").rename(ckpt / "best.safetensors")  # as older versions named it
    resumed = _toy(seed=2)
    more = cfg.model_copy(update={"epochs": 3})
    got = fit(resumed, _toy_batches, more, tmp_path, _scripted(None, [0.2]), resume=True, progress=False)
    assert (got.best_epoch, got.best_metric, got.epochs_run) == (1, 0.5, 3)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, snaps[0][key]), key
