"""A minimal user-side LightningModule around a tiny transformers LM, as a researcher would write one."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tiny_models import tiny_causal_lm, tiny_tokenizer

TEXT = ("the cat sees the dogs . the dogs that the cat sees run . no author has ever seen a lobster . "
        "the authors who the guard likes laugh . a pilot hurt himself . the senators hurt themselves . ") * 40


class TinyLM(L.LightningModule):
    """Causal-LM training of a tiny model; holds ``self.model`` (a PreTrainedModel) and ``self.tokenizer``."""

    def __init__(self, family: str = "neox", lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer = tiny_tokenizer()
        self.model = tiny_causal_lm(family, seed=seed).train()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def token_loader(tokenizer, seq_len: int = 32, batch_size: int = 8, n_batches: int = 64) -> DataLoader:
    """A fixed, unshuffled loader of token blocks cut from TEXT."""
    ids = tokenizer(TEXT)["input_ids"]
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)]
    blocks = (blocks * (1 + batch_size * n_batches // len(blocks)))[: batch_size * n_batches]
    return DataLoader(TensorDataset(torch.tensor(blocks)), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, max_steps: int, callbacks=(), logger=True, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer logging to TensorBoard under ``tmp_path``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    from lightning.pytorch.callbacks import ModelCheckpoint

    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), **kwargs)


def run_script(tmp_path, name: str, source: str, *args: str, launcher: tuple[str, ...] = (),
               extra_env: dict | None = None, timeout: int = 240, hang: str = "the run hung"):
    """Write ``source`` to ``tmp_path/name`` and run it (after ``launcher``, e.g. torchrun's module) with this
    folder on ``PYTHONPATH``, in its own process group: a run still going after ``timeout`` seconds is killed whole
    and the test fails with ``hang``. Returns the ``(returncode, stdout, stderr)`` of a run that ended."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    script = tmp_path / name
    script.write_text(source)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, *launcher, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{hang}:\n{err[-3000:]}")
    return proc.returncode, out, err
