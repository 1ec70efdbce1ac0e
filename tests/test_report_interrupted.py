"""A report killed half-way leaves only whole files, and running it again completes it."""

from __future__ import annotations

import pytest

from negmonitor.cli import main
from negmonitor.report import base
from negmonitor.report.build import build_report
from tiny_models import tiny_causal_lm, tiny_tokenizer


def test_interrupted_report_leaves_whole_files_and_reruns(tmp_path, monkeypatch) -> None:
    model_dir = tmp_path / "model"
    tiny_causal_lm("neox").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "probe.txt"
    text.write_text("the cat sees the dogs . the dogs that the cat sees run . no author has ever laughed . " * 300)
    assert main(["probe", "--model", str(model_dir), "--text", str(text), "--tokens", "4096", "--window", "64",
                 "--pairs", "300", "--out", str(tmp_path / "probe")]) == 0
    out = tmp_path / "report"
    drawn = [spec for spec in base.REGISTRY]
    victim = next(s for s in drawn if s.key == "figA1_jaccard")

    def killed(ctx):
        raise KeyboardInterrupt  # as if the process were stopped here

    monkeypatch.setattr(victim, "draw", killed)
    with pytest.raises(KeyboardInterrupt):
        build_report([tmp_path / "probe"], out, echo=lambda line: None)
    assert not (out / "index.html").exists()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    result = build_report([tmp_path / "probe"], out, echo=lambda line: None)
    assert (out / "index.html").exists() and "figA1_jaccard" in [f.key for f in result.figures]
    assert "figA1_jaccard" in (out / "index.html").read_text()
