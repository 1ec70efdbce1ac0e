"""The callback with every kind of Lightning logger: real Trainer runs, each logger's own files read back.

TensorBoard (event files), CSV (metrics.csv), MLflow (a local file store, read with its client), W&B (offline run,
its transaction log read back), two loggers at once, and none; records land in a folder unique to the run.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch import seed_everything
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.records import RecordStore

FAST = dict(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100, every_n_steps=2, media_every_n_steps=2)
HEADLINE = ["negmonitor/wd/max/layer_00", "negmonitor/wd/max/layer_01", "negmonitor/wd/cohort_mean",
            "negmonitor/pairs/nn_share/layer_01", "negmonitor/md/mean/layer_00"]


def _fit(tmp_path: Path, logger, max_steps: int = 2, **kwargs) -> NegativeDifferentiationMonitor:
    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(**{**FAST, **kwargs})
    trainer(tmp_path, max_steps, [monitor], logger=logger).fit(module, token_loader(module.tokenizer, n_batches=4))
    return monitor


def _records(log_dir: Path) -> pd.DataFrame:
    scalars = RecordStore.for_logdir(log_dir).read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2], log_dir
    assert scalars.run.str.len().min() > 0
    return scalars


def _record_value(scalars: pd.DataFrame, metric: str, layer: int, step: int) -> float:
    rows = scalars[(scalars.metric == metric) & (scalars.layer == layer) & (scalars.step == step)]
    return float(rows.value.iloc[0])


def test_csv_logger_gets_the_scalars_and_one_note(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    with pytest.warns(UserWarning, match="CSVLogger takes scalars only") as notes:
        _fit(tmp_path, logger)
    assert sum("takes scalars only" in str(n.message) for n in notes) == 1
    log_dir = tmp_path / "csv" / "version_0"
    metrics = pd.read_csv(log_dir / "metrics.csv")
    for name in HEADLINE:
        assert name in metrics.columns, name
    scalars = _records(log_dir)
    logged = metrics.dropna(subset=["negmonitor/wd/max/layer_01"]).set_index("step")["negmonitor/wd/max/layer_01"]
    assert sorted(logged.index) == [0, 2]
    assert logged[2] == pytest.approx(_record_value(scalars, "wd/max", 1, 2), rel=1e-6)
    assert set(scalars.run) == {"version_0"}


def test_mlflow_logger_with_a_local_file_store(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path}/mlruns"
    logger = MLFlowLogger(experiment_name="nm", tracking_uri=uri)
    with pytest.warns(UserWarning, match="MLFlowLogger takes scalars only"):
        _fit(tmp_path, logger)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(logger.run_id, "negmonitor/wd/max/layer_01")
    assert sorted(m.step for m in history) == [0, 2]
    logged = set(client.get_run(logger.run_id).data.metrics)
    # a whole-model curve whose name is also the folder of its per-layer curves gets /all_layers in MLflow
    assert {"negmonitor/wd/max/layer_00", "negmonitor/wd/cohort_mean/all_layers", "negmonitor/md/mean/layer_00",
            "negmonitor/pairs/nn_share/layer_01", "negmonitor/wd/max/all_layers"} <= logged
    log_dir = tmp_path / "mlruns" / logger.experiment_id / logger.run_id
    scalars = _records(log_dir)
    assert set(scalars.run) == {logger.run_id}
    by_step = {m.step: m.value for m in history}
    assert by_step[2] == pytest.approx(_record_value(scalars, "wd/max", 1, 2), rel=1e-6)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode, quiet, with its caches and settings inside ``tmp_path``: nothing leaves the machine."""
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true",
                       "WANDB_X_DISABLE_META": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))


def _wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The ``history`` records of an offline run's transaction log (``run-<id>.wandb``: W&B's LevelDB-style log of
    protobuf ``Record``s in 32 KiB blocks; wandb 0.31 ships no reader for it)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = run_file.read_bytes(), 32_768, 7, b"", []
    assert data[:4] == b":W&B", run_file
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_logger_offline_and_two_runs_keep_their_records(tmp_path, wandb_offline) -> None:
    from lightning.pytorch.loggers import WandbLogger

    run_ids = []
    for _ in range(2):  # two runs into one save_dir
        logger = WandbLogger(save_dir=str(tmp_path), project="nm", offline=True)
        _fit(tmp_path, logger)
        run_ids.append(logger.version)
        logger.experiment.finish()
    assert len(set(run_ids)) == 2
    for run_id in run_ids:
        scalars = _records(tmp_path / "nm" / run_id)
        assert set(scalars.run) == {run_id}
    assert not (tmp_path / "negmonitor").exists()

    (run_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_ids[1]}/run-{run_ids[1]}.wandb")
    history = _wandb_history(run_file)
    scalar_rows = [row for row in history if "negmonitor/wd/max/layer_01" in row]
    assert sorted(int(row["trainer/global_step"]) for row in scalar_rows) == [0, 2]
    assert all(name in scalar_rows[0] for name in HEADLINE)
    scalars = _records(tmp_path / "nm" / run_ids[1])
    step2 = next(row for row in scalar_rows if row["trainer/global_step"] == "2")
    assert float(step2["negmonitor/wd/max/layer_01"]) == pytest.approx(_record_value(scalars, "wd/max", 1, 2), rel=1e-6)
    media = {key.rsplit("/", 1)[0]: value for row in history for key, value in row.items() if key.endswith("/_type")}
    assert media["negmonitor/wd/distribution/layer_00"] == '"histogram"'
    assert media["negmonitor/images/top_neurons/layer_01"] == '"image-file"'
    assert media["negmonitor/pairs/top/layer_00"] == '"table-file"'
    files = run_file.parent / "files" / "media"
    assert list((files / "images").rglob("*.png")) and list((files / "table").rglob("*.table.json"))


def test_two_loggers_at_once(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [TensorBoardLogger(str(tmp_path), name="tb", version=0), CSVLogger(str(tmp_path), name="csv")]
    with pytest.warns(UserWarning, match="CSVLogger takes scalars only"):
        _fit(tmp_path, loggers)
    tb_dir = tmp_path / "tb" / "version_0"
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(HEADLINE) <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("negmonitor/wd/max/layer_01")] == [0, 2]
    assert "negmonitor/wd/distribution/layer_01" in tags["histograms"]
    assert "negmonitor/images/top_neurons/layer_00" in tags["images"]
    assert any(t.startswith("negmonitor/pairs/top/layer_01") for t in tags["tensors"])
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert set(HEADLINE) <= set(metrics.columns)
    _records(tb_dir)  # the first logger's folder
    assert not (tmp_path / "csv" / "version_0" / "negmonitor").exists()


def test_no_logger_records_under_default_root_dir_one_folder_per_run(tmp_path) -> None:
    for _ in range(2):
        with pytest.warns(UserWarning, match="no logger on this Trainer"):
            _fit(tmp_path, False)
    for version in ("version_0", "version_1"):
        scalars = _records(tmp_path / "lightning_logs" / version)
        assert set(scalars.run) == {version}


def test_top_neuron_histograms_tick_their_range_and_zero_where_it_does_not_crowd() -> None:
    from negmonitor.monitoring.tensorboard import _range_ticks

    assert _range_ticks(-3.9, 3.07) == ([-3.9, 0.0, 3.07], ["-3.9", "0", "3.07"])
    assert _range_ticks(-23.2, -0.0546)[0] == [-23.2, -0.0546]  # zero would overprint the range's end
    assert _range_ticks(2.0, 5.0)[0] == [0.0, 2.0, 5.0]  # the zero line is drawn: the axis reaches it
