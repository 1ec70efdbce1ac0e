"""``negmonitor train``: every shipped config parses and builds; the default config runs end to end (shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.cli import main
from negmonitor.commands.train import build_cli
from negmonitor.records import RecordStore

CONFIGS = Path(__file__).resolve().parents[1] / "training_configs"
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
          "--trainer.num_nodes", "1", "--trainer.precision", "32-true"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_builds(name, tmp_path) -> None:
    """GPU and multi-node recipes are built with CPU overrides: the objects, not the hardware, are checked."""
    cli = build_cli(["--config", str(CONFIGS / name), *ON_CPU, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, NegativeDifferentiationMonitor)]
    assert len(monitors) == 1
    assert cli.model.hparams.family in {"neox", "llama", "gpt2"}
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert cli.trainer.max_steps == raw["trainer"]["max_steps"]
    assert monitors[0].schedule.every_n_steps == raw["monitor"]["every_n_steps"]


def test_ddp_recipe_keeps_pythia_tokens_per_step() -> None:
    raw = yaml.safe_load((CONFIGS / "pythia-160m-pile-ddp.yaml").read_text())
    trainer, data = raw["trainer"], raw["data"]
    tokens = (trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] * data["batch_size"]
              * data["seq_len"])
    assert tokens == raw["monitor"]["tokens_per_step"] == 2_097_152


def test_default_config_runs_and_prints_summary(tmp_path, capsys) -> None:
    code = main(["train", "--config", str(CONFIGS / "tiny-neox-cpu.yaml"),
                 "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--data.n_sentences", "3000", "--data.tokenizer_vocab_size", "1000",
                 "--model.hidden_size", "32", "--model.num_layers", "2", "--model.intermediate_size", "64",
                 "--monitor.every_n_steps", "3", "--monitor.log_spaced_until", "0", "--monitor.warmup_steps", "0",
                 "--monitor.probe_tokens", "2048", "--monitor.n_pairs", "200", "--monitor.minimal_pairs_sample", "4",
                 "--monitor.ablation.max_matching_evals", "2"])
    out = capsys.readouterr().out
    assert code == 0
    log_dir = tmp_path / "runs" / "tiny-neox-cpu" / "version_0"
    assert (log_dir / "config.yaml").exists()
    assert "tensorboard --logdir" in out and str(log_dir) in out
    assert "cohort mean WD" in out and "ppl ratio, Wasserstein ablation" in out
    scalars = RecordStore.for_logdir(log_dir).read_scalars()
    assert sorted(scalars.step.unique()) == [0, 3, 6]
    assert {"ablation/acc_drop/grammar/wasserstein", "ablation/acc_drop/grammar/random"} <= set(scalars.metric)


@pytest.mark.parametrize("override, message", [
    (["--model.no_such_key", "1"], "no_such_key"),
    (["--model.hidden_size", "wide"], "hidden_size"),
])
def test_bad_config_keys_fail_clearly(override, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(CONFIGS / "tiny-neox-cpu.yaml"), *override])
    assert exit_.value.code != 0
    assert message in capsys.readouterr().err


def test_missing_config_file(capsys) -> None:
    assert main(["train", "--config", "nope.yaml"]) == 2
    assert "config file nope.yaml does not exist" in capsys.readouterr().err
