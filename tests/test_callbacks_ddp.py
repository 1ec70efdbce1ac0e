"""Under Lightning DDP (2 CPU processes, gloo) the logged statistics equal the single-process values."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lightning_helpers import TEXT, TinyLM, run_script
from negmonitor import probing
from negmonitor.adapters import find_sites
from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from negmonitor.probing import ProbeSettings, _plan
from negmonitor.records import RecordStore

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    import lightning as L
    from lightning.pytorch import seed_everything
    from lightning_helpers import TEXT, TinyLM, token_loader
    from negmonitor.callbacks import NegativeDifferentiationMonitor

    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=2_048, probe_window=64, n_pairs=200,
                                             every_n_steps=2, log_dir=sys.argv[1],
                                             memory_budget=None if sys.argv[3] == "none" else int(sys.argv[3]))
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=sys.argv[1])
    import json
    from negmonitor import probing
    calls = {}  # calibration forwards per measurement step, rank 0
    calibrate = probing._calibrate

    def counted(*args):
        if trainer.global_rank == 0:
            calls[str(trainer.global_step)] = calls.get(str(trainer.global_step), 0) + 1
        return calibrate(*args)

    probing._calibrate = counted
    trainer.fit(module, token_loader(module.tokenizer))
    if trainer.global_rank == 0:
        with open(f"{sys.argv[1]}/calibrations.json", "w") as f:
            json.dump(calls, f)
''')


@pytest.mark.parametrize("one_layer_per_pass", [False, True], ids=["one-pass", "one-layer-per-pass"])
def test_ddp_equals_single_process(tmp_path, one_layer_per_pass) -> None:
    """Also with a budget that holds one layer at a time: each rank then runs two passes, the second from the
    hidden states its first one cached."""
    budget = "none"
    if one_layer_per_pass:
        model = TinyLM().model
        probe_set = ProbeSet.build([TEXT], TinyLM().tokenizer, n_tokens=2_048, window=64, n_pairs=200)
        sites, free = find_sites(model), ProbeSettings(memory_budget=None)
        limit = (max(_plan(model, probe_set, [site], free, 2).need[0] for site in sites)
                 + probing._residual_bytes(model, probe_set, sites, free, 2) + 1)
        plan = _plan(model, probe_set, sites, ProbeSettings(memory_budget=limit), 2)
        assert plan.groups == [[0], [1]] and plan.resume
        budget = str(limit)
    code, _, err = run_script(tmp_path, "ddp_run.py", SCRIPT, str(tmp_path / "logs"), str(Path(__file__).parent),
                              budget, timeout=300, hang="the DDP run hung")
    assert code == 0, err[-3000:]
    assert ("2 pass(es)" in err) == one_layer_per_pass
    assert "failed" not in err, err[-3000:]  # rank 1 failed every measurement after its probe pass (no columns)
    # one calibration forward per measurement for every layer, not one per pass (each from the embeddings)
    calls = json.loads((tmp_path / "logs" / "calibrations.json").read_text())
    assert calls == {"0": 1, "2": 1}, calls
    store = RecordStore.for_logdir(tmp_path / "logs")
    assert list((tmp_path / "logs" / "negmonitor" / "scalars").glob("*.parquet")), "rank 0 wrote no records"
    neurons = store.read_neurons()
    ddp = neurons[neurons.step == 0].sort_values(["layer", "neuron"])

    module = TinyLM()  # same seed: the same initial weights the DDP run measured at step 0
    probe_set = ProbeSet.build([TEXT], module.tokenizer, n_tokens=2_048, window=64, n_pairs=200)
    single = take_measurement(module.model, probe_set, 0, MonitorSettings(), MonitorState()).neurons
    single = single.sort_values(["layer", "neuron"])
    for column in ("wd", "wd_neg", "md", "mean", "std"):
        np.testing.assert_allclose(ddp[column].to_numpy(), single[column].to_numpy(), atol=1e-4, rtol=0, err_msg=column)
    scalars = store.read_scalars()
    assert scalars.groupby(["run", "step", "layer", "metric"]).size().max() == 1  # only rank 0 wrote


SETUP_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, sys.argv[2])
    import lightning as L
    from lightning.pytorch import seed_everything
    from lightning_helpers import TEXT, TinyLM, token_loader
    from negmonitor.callbacks import NegativeDifferentiationMonitor

    seed_everything(0)
    module = TinyLM()
    # the probe file exists on rank 0's node only (a relative path, a node-local disk)
    probe = sys.argv[3] if int(os.environ.get("LOCAL_RANK", 0)) == 0 else sys.argv[3] + ".not-on-this-node"
    monitor = NegativeDifferentiationMonitor(probe=probe, probe_tokens=1_024, probe_window=64, n_pairs=100,
                                             every_n_steps=2, log_dir=sys.argv[1])
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=sys.argv[1])
    trainer.fit(module, token_loader(module.tokenizer))
''')


def test_a_set_up_that_fails_on_one_rank_ends_every_rank(tmp_path) -> None:
    """Rank 1 cannot read the probe: every rank's run ends at set-up, rank 0 saying which rank failed, instead of
    training on alone into a collective the failed rank never joins. The two processes are started from outside,
    as srun starts them on a cluster (Lightning then kills no peer of a failed rank). Before, rank 0 went on into
    its first gradient all-reduce: gloo there notices the dead peer ("Connection closed by peer", which names no
    cause); NCCL waits for the process group's timeout (30 minutes)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    probe = tmp_path / "probe.txt"
    probe.write_text(TEXT)
    script = tmp_path / "ddp_setup.py"
    script.write_text(SETUP_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tests_dir = str(Path(__file__).parent)
    procs = []
    for rank in (0, 1):
        inherited = {k: v for k, v in os.environ.items()  # no cluster variables that would steer Lightning
                     if not k.startswith(("SLURM_", "TORCHELASTIC_", "GROUP_", "LOCAL_", "RANK", "WORLD_", "MASTER_"))}
        env = {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "NODE_RANK": "0", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs"), tests_dir, str(probe)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=str(tmp_path), start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=150))
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 went on training while rank 1's set-up had failed (the run hung)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert [proc.returncode != 0 for proc in procs] == [True, True]
    assert "probe.txt.not-on-this-node" in outputs[1][1], outputs[1][1][-3000:]
    assert "negmonitor's set-up failed on rank(s) [1] (see the error there); every rank stops" in outputs[0][1], \
        outputs[0][1][-3000:]  # rank 0 says which rank failed
    assert not list((tmp_path / "logs").rglob("step-*.parquet"))  # nothing measured
