"""``negmonitor probe`` end to end, and the one-line errors of the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from negmonitor.cli import main
from tiny_models import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-neox"
    tiny_causal_lm("neox").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from conftest import SHARED_DATA

    source = SHARED_DATA / "wikitext-2" / "valid.txt"
    path = tmp_path_factory.mktemp("text") / "probe.txt"
    path.write_text(source.read_text()[:40_000] if source.exists() else "the cat sees the dogs . " * 2_000)
    return path


def test_probe_command_writes_tables_and_prints_summary(model_dir, text_file, tmp_path, capsys) -> None:
    code = main(["probe", "--model", str(model_dir), "--text", str(text_file), "--tokens", "4096", "--window", "128",
                 "--pairs", "300", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("neurons", "layers", "pairs", "top_pairs"):
        assert (tmp_path / "out" / f"{name}.parquet").exists()
    layers = pd.read_parquet(tmp_path / "out" / "layers.parquet")
    assert list(layers.layer) == [0, 1]
    assert "wd_max" in out and "wd_neg_share" in out and "jaccard_wd_md" in out and str(tmp_path / "out") in out
    assert "in float32" in out  # the dtype it ran in: fp32 on CPU by default, printed and recorded
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["protocol"] == "negmonitor"


def test_probe_command_records_the_dtype_asked_for(model_dir, text_file, tmp_path, capsys) -> None:
    code = main(["probe", "--model", str(model_dir), "--text", str(text_file), "--tokens", "1024", "--window", "128",
                 "--pairs", "100", "--dtype", "bf16", "--out", str(tmp_path / "out")])
    assert code == 0 and "in bfloat16" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["dtype"] == "bfloat16"


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("probe", "ablate", "replay", "train", "report"):
        assert command in out


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such-model-xyz"], "could not load"),
    (["--model", "./missing-folder"], "is not a folder here nor a hub id"),
    (["--layers", "7"], "layer 7 is out of range"),
    (["--layers", "a,b"], "--layers must be comma-separated integers"),
    (["--pairs", "100000"], "fewer than the 200000 needed"),
])
def test_bad_input_is_one_line_exit_2(model_dir, text_file, tmp_path, capsys, args, message) -> None:
    base = {"--model": str(model_dir), "--text": str(text_file), "--tokens": "2048", "--window": "64",
            "--pairs": "100", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["probe"] + [x for pair in base.items() for x in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # earlier lines are progress bars (weights loading)
    assert last.startswith("negmonitor: error: ") and message in last, err
    assert "Traceback" not in err


def test_empty_text_and_unwritable_out(model_dir, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["probe", "--model", str(model_dir), "--text", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["probe", "--model", str(model_dir), "--text", str(empty), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and len(err.strip().splitlines()) == 1  # fails before loading anything


def test_debug_shows_the_traceback(model_dir, tmp_path) -> None:
    from negmonitor.errors import NegmonitorError

    with pytest.raises(NegmonitorError):
        main(["probe", "--debug", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("args, message", [
    (["--text", "no-such-probe.txt"], "no-such-probe.txt"),
    (["--layers", "7"], "layer 7 is out of range"),
    (["--tokens", "10000000"], "fewer than --tokens"),
    (["--memory-budget", "1KiB"], "budget"),
])
def test_bad_probe_input_is_refused_before_the_weights_load(model_dir, text_file, tmp_path, capsys, monkeypatch,
                                                           args, message) -> None:
    """A typo in the probe text, the layers or the budget must not cost a 16-24 GB download and load first."""
    import negmonitor.models

    def no_load(*args, **kwargs):
        raise AssertionError("the weights loaded before the input was checked")

    monkeypatch.setattr(negmonitor.models, "load_model", no_load)
    base = {"--model": str(model_dir), "--text": str(text_file), "--tokens": "2048", "--window": "64",
            "--pairs": "100", "--out": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["probe"] + [x for pair in base.items() for x in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("negmonitor: error: ") and message in err.splitlines()[-1], err


def test_a_revision_beside_a_local_folder_is_refused(model_dir, text_file, tmp_path, capsys) -> None:
    """transformers ignores revision= for a folder: its own weights (a Pythia download is step143000) would be
    probed and written out labelled step1000."""
    code = main(["probe", "--model", str(model_dir), "--revision", "step1000", "--text", str(text_file),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--revision 'step1000' applies to hub ids" in err and "local folder" in err
    assert not (tmp_path / "o" / "meta.json").exists()


def test_a_model_folder_without_tokenizer_files_is_named_as_such(text_file, tmp_path, capsys) -> None:
    """GPT-NeoX's config alone makes transformers build an empty tokenizer: every text became no tokens and the
    error blamed the probe text."""
    folder = tmp_path / "model-only"
    tiny_causal_lm("neox").save_pretrained(folder)
    assert main(["probe", "--model", str(folder), "--text", str(text_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "turns text into no tokens" in err and "--tokenizer PATH" in err and "is empty" not in err


def test_an_earlier_result_in_out_is_said_to_be_replaced(model_dir, text_file, tmp_path, capsys) -> None:
    argv = ["probe", "--model", str(model_dir), "--text", str(text_file), "--tokens", "1024", "--window", "128",
            "--pairs", "100", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "replaces" not in capsys.readouterr().err
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'} holds an earlier probe result of {model_dir}; this run replaces it" in err


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "the probe batch size must be a positive integer, got 0"),
    (["--window", "1"], "the window at least 2 tokens"),
])
def test_out_of_range_numbers_are_one_line(model_dir, text_file, tmp_path, capsys, args, message) -> None:
    argv = ["probe", "--model", str(model_dir), "--text", str(text_file), "--out", str(tmp_path / "o"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_gated_hub_model_says_how_to_log_in() -> None:
    from negmonitor.models import _load_error

    error = _load_error("meta-llama/Llama-3.1-8B", None, OSError(
        "You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/..."))
    assert "is gated on the hub" in str(error) and "hf auth login" in str(error) and "\n" not in str(error)
