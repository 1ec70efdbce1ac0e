"""Every model a `negmonitor train` run makes is usable by every command: the final save_pretrained folder, the
last checkpoint and any other .ckpt, as --model of probe, ablate, replay and report; and .ckpt files of a
user's own LightningModule."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from negmonitor.cli import main
from negmonitor.errors import NegmonitorError
from negmonitor.models import load_model
from negmonitor.records import RecordStore

CONFIGS = Path(__file__).resolve().parents[1] / "training_configs"
STEPS = 8
TINY = ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--data.n_sentences", "3000", "--data.tokenizer_vocab_size", "1000",
        "--model.hidden_size", "32", "--model.num_layers", "2", "--model.intermediate_size", "64",
        "--monitor.every_n_steps", "3", "--monitor.log_spaced_until", "0", "--monitor.warmup_steps", "0",
        "--monitor.probe_tokens", "2048", "--monitor.n_pairs", "200", "--monitor.minimal_pairs_sample", "4",
        "--monitor.ablation.max_matching_evals", "2", "--monitor.ablation.random_draws", "1",
        "--monitor.ablation_every_n_steps", "100", "--monitor.media_every_n_steps", "5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A real, short `negmonitor train` run of the README's config; its log folder and console output."""
    root = tmp_path_factory.mktemp("train")
    import logging
    import warnings

    out, records = io.StringIO(), []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(["train", "--config", str(CONFIGS / "tiny-neox-cpu.yaml"), "--trainer.max_steps", str(STEPS),
                         "--trainer.logger.init_args.save_dir", str(root / "runs"), *TINY])
    finally:
        logging.getLogger().removeHandler(handler)
    assert code == 0
    log_dir = root / "runs" / "tiny-neox-cpu" / "version_0"
    return {"log_dir": log_dir, "out": out.getvalue(), "root": root, "logged": [r.getMessage() for r in records],
            "warnings": [str(w.message) for w in caught]}


def test_train_saves_final_model_and_last_checkpoint(run) -> None:
    log_dir = run["log_dir"]
    final, last = log_dir / "final_model", log_dir / "checkpoints" / "last.ckpt"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    assert f"final model:      {final}" in run["out"] and f"last checkpoint:  {last}" in run["out"]


def test_console_is_a_line_per_measurement_when_not_a_terminal(run) -> None:
    lines = run["out"].splitlines()
    assert lines[0] == f"training from step 0 to {STEPS}; a line per negmonitor measurement follows"
    measured = [line for line in lines if "negmonitor measured" in line]
    assert [line.split()[1] for line in measured] == [f"{s}/{STEPS}" for s in (0, 3, 6, STEPS)]
    # each line has its own measurement's timings: ablation at the first and the final one only
    assert ["ablation" in line for line in measured] == [True, False, False, True]
    assert "Epoch" not in run["out"]
    assert not [m for m in run["logged"] if "Tip:" in m]
    assert not [m for m in run["warnings"] if "compute" in m and "PairBuffer" in m]


def test_step_progress_bar_counts_optimizer_steps(tmp_path, capsys) -> None:
    import lightning as L

    from lightning_helpers import TinyLM, token_loader
    from negmonitor.train.progress import StepProgressBar

    module = TinyLM()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[StepProgressBar(lines=False)],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, token_loader(module.tokenizer, n_batches=20))
    out = capsys.readouterr().out
    assert "6/6" in out and "step" in out and "Epoch" not in out


def test_summary_and_records_hold_a_final_ablation(run) -> None:
    """Ablation every 100 steps in an 8-step run: at step 0 and, because it is the end, at step 8."""
    scalars = RecordStore.for_logdir(run["log_dir"]).read_scalars()
    steps = sorted(scalars[scalars.metric == "ablation/margin_drop/grammar/wasserstein"].step.unique())
    assert steps == [0, STEPS]
    line = next(line for line in run["out"].splitlines() if "margin drop, Wasserstein" in line)
    assert f"step {STEPS:>5}" in line


def test_media_come_at_the_configured_cadence(run) -> None:
    """Measurements at 0, 3, 6, 8 with media every 5 steps: media at 0, 6 (first after 5) and 8 (the end)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["log_dir"]), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    tag = next(t for t in events.Tags()["histograms"] if t.startswith("negmonitor/wd/distribution"))
    assert sorted(e.step for e in events.Histograms(tag)) == [0, 6, STEPS]


@pytest.mark.parametrize("which", ["final_model", "last.ckpt", "first.ckpt"])
def test_probe_takes_every_model_of_the_run(run, which, tmp_path, shared_data) -> None:
    log_dir = run["log_dir"]
    ckpts = sorted((log_dir / "checkpoints").glob("epoch=*.ckpt"))
    model = {"final_model": log_dir / "final_model", "last.ckpt": log_dir / "checkpoints" / "last.ckpt",
             "first.ckpt": ckpts[0]}[which]
    out = tmp_path / "probe"
    code = main(["probe", "--model", str(model), "--text", str(shared_data / "wikitext-2" / "test.txt"),
                 "--tokens", "4096", "--window", "64", "--pairs", "500", "--out", str(out)])
    assert code == 0
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert len(neurons) == 2 * 64 and neurons.wd.notna().all()


def test_last_checkpoint_and_final_model_are_the_same_model(run) -> None:
    log_dir = run["log_dir"]
    a, tok_a = load_model(log_dir / "final_model")
    b, tok_b = load_model(log_dir / "checkpoints" / "last.ckpt")
    ids = torch.tensor([tok_a("the cat sees the dogs .")["input_ids"]])
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_ablate_on_the_final_model_reproduces_the_runs_ablation(run, tmp_path) -> None:
    """`--eval grammar --text grammar --probe-text grammar`: the run's own minimal pairs, perplexity and probe text;
    baseline accuracy and margin
    equal those the monitor recorded at the last step."""
    out = tmp_path / "ablate"
    code = main(["ablate", "--model", str(run["log_dir"] / "final_model"), "--eval", "ppl,grammar", "--text",
                 "grammar", "--probe-text", "grammar", "--ppl-window", "64", "--sample", "4", "--tokens", "2048",
                 "--window", "64", "--fraction", "0.05",
                 "--ppl-tokens", "2048", "--max-matching-evals", "2", "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out / "ablation.csv").set_index("condition")
    assert {"grammar_acc", "grammar_margin"} <= set(table.columns) and "tse_acc" not in table.columns
    scalars = RecordStore.for_logdir(run["log_dir"]).read_scalars()
    recorded = scalars[(scalars.step == STEPS) & (scalars.metric == "ablation/acc/grammar/baseline")].value
    assert table.loc["baseline", "grammar_acc"] == pytest.approx(float(recorded.iloc[0]))
    assert json.loads((out / "ablation_meta.json").read_text())["grammar_seed"] == 0


def test_replay_of_the_runs_checkpoints_finds_its_tokenizer_and_says_what_is_true(run, tmp_path, capsys) -> None:
    logdir = tmp_path / "replay"
    code = main(["replay", "--model", str(run["log_dir"] / "checkpoints"), "--revisions", "all", "--logdir",
                 str(logdir), "--probe", str(_probe_file(tmp_path)),
                 "--tokens", "2048", "--window", "64", "--pairs", "200", "--no-progress"])
    assert code == 0
    scalars = RecordStore.for_logdir(logdir).read_scalars()
    assert STEPS in set(scalars.step)
    assert f"tensorboard --logdir {logdir}\n" in capsys.readouterr().out + "\n"
    info = json.loads((logdir / "negmonitor" / "replay.json").read_text())
    batch, seq_len = 32, 64  # the config's data.batch_size and seq_len: tokens per optimizer step
    assert info["tokens_per_step"] == batch * seq_len and info["tokens_seen_from"] == "recorded in each checkpoint"
    assert set(scalars[scalars.step == STEPS].tokens_seen) == {STEPS * batch * seq_len}


def test_report_recomputes_activations_from_a_checkpoint(run, tmp_path) -> None:
    out = tmp_path / "report"
    code = main(["report", str(run["log_dir"]), "--out", str(out), "--only", "1c",
                 "--model", str(run["log_dir"] / "checkpoints" / "last.ckpt"), "--hist-tokens", "1024"])
    assert code == 0
    html = (out / "index.html").read_text()
    assert "recomputed" in html and "last.ckpt" in html


def _probe_file(tmp_path: Path) -> Path:
    from negmonitor.train.grammar import GrammarCorpus

    path = tmp_path / "probe.txt"
    path.write_text("\n".join(GrammarCorpus(0).heldout_texts()), encoding="utf-8")
    return path


# --- a user's own LightningModule ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A .ckpt of a LightningModule that is not negmonitor's (the model under ``self.model``, no hparams)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_helpers import TinyLM, token_loader, trainer

    root = tmp_path_factory.mktemp("user")
    module = TinyLM()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt")
    trainer(root, max_steps=2, callbacks=[checkpoint]).fit(module, token_loader(module.tokenizer, n_batches=2))
    return Path(checkpoint.best_model_path), module


def test_user_module_checkpoint_loads_with_its_config_beside(user_checkpoint, tmp_path) -> None:
    path, module = user_checkpoint
    folder = tmp_path / "beside"
    folder.mkdir()
    target = folder / path.name
    target.write_bytes(path.read_bytes())
    with pytest.raises(NegmonitorError, match="cannot tell which transformers model"):
        load_model(target)
    module.model.config.save_pretrained(folder)
    with pytest.raises(NegmonitorError, match="no tokenizer found beside checkpoint"):
        load_model(target)
    model, tokenizer = load_model(target, tokenizer=_saved_tokenizer(module, tmp_path))
    trained = module.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())
    ids = torch.tensor([tokenizer("the cat sees the dogs .")["input_ids"]])
    assert torch.allclose(model(ids).logits, module.model.eval()(ids).logits, atol=1e-5)  # sdpa vs eager attention


def test_checkpoint_without_a_tokenizer_is_one_line_exit_2(user_checkpoint, tmp_path, capsys) -> None:
    path, module = user_checkpoint
    module.model.config.save_pretrained(path.parent)
    code = main(["probe", "--model", str(path), "--tokens", "512", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--tokenizer" in err
    assert not (tmp_path / "out").exists()


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {"boom": _Boom()}}, path,
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(NegmonitorError, match="weights_only"):
        load_model(path)
    assert not (tmp_path / "PWNED").exists()


def _saved_tokenizer(module, tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    module.tokenizer.save_pretrained(folder)
    return folder


def test_more_tokens_than_the_text_holds_is_one_line_exit_2(run, tmp_path, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("\n".join(_grammar_lines(40)), encoding="utf-8")
    out = tmp_path / "never"
    code = main(["probe", "--model", str(run["log_dir"] / "final_model"), "--text", str(text), "--tokens", "32768",
                 "--window", "64", "--pairs", "10", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "fewer than --tokens 32,768" in err and "pass --tokens" in err
    assert not out.exists()


def _grammar_lines(n: int) -> list[str]:
    from negmonitor.train.grammar import GrammarCorpus

    return GrammarCorpus(0).heldout_texts(n)


def test_cli_prints_warnings_as_one_line_and_restores_the_formatter(tmp_path, capsys, monkeypatch) -> None:
    import warnings

    import negmonitor.commands.probe as probe_command

    def warn_twice(args) -> int:
        warnings.warn("negmonitor: something\nto say", stacklevel=1)
        warnings.warn("third-party\nnotice", DeprecationWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(probe_command, "run", warn_twice)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["probe", "--model", "x", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "negmonitor: something to say"
    assert err[1].startswith("warning: third-party notice (DeprecationWarning, test_run_outputs.py:")
    assert len(err) == 2 and warnings.showwarning is before



def test_records_keep_the_top_neurons_histograms(run) -> None:
    """Every measurement keeps a 64-bin histogram per top-WD neuron (4 per layer) of its values at the 2 x 200
    sampled probe positions, so a report draws real distributions without the model."""
    hist = RecordStore.for_logdir(run["log_dir"]).read("histograms")
    assert sorted(hist.step.unique()) == [0, 3, 6, STEPS]
    per_neuron = hist.groupby(["step", "layer", "neuron"])
    assert per_neuron.size().eq(64).all() and per_neuron["count"].sum().eq(400).all()
    assert hist.groupby(["step", "layer"]).neuron.nunique().eq(4).all()
