"""steps_per_call: K optimizer steps per call of the training step train bit for bit what K = 1 trains (every
variant and optimizer, a scheduler and clipping on, across epoch ends, a short last chunk, the batch limit, a
mid-epoch resume, SIGTERM inside a chunk, 2-process DDP), log the same train/loss, stop a divergence inside a chunk
at the same step, and a value the engine cannot take is one line and exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_one_line_error, assert_same_weights, run_cli, run_main

from gruexp.guards import Diverged
from gruexp.train import train

# hidden 16, 4 x 8 batches of the first 2000 characters: 62 batches an epoch, so a chunk of 4 batches ends at steps
# 4, 8, .. 60, 62 (the epoch's last chunk holds 2), then 66, 70, .. in epoch 1
SMALL = [
    "model.hidden_size=16",
    "data.batch_size=4",
    "data.num_steps=8",
    "data.max_tokens=2000",
    "data.val_tokens=400",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=3",
    "trainer.gradient_clip_val=0.1",  # below most steps' gradient norm: clipping acts (asserted where it matters)
    "logger=csv",
]
PER_EPOCH = 62
# total_steps from the run (steps.stepping_batches), or given (+scheduler.total_steps=...)
COSINE = [
    "+scheduler._target_=gruexp.schedules.warmup_cosine",
    "+scheduler._partial_=true",
    "+scheduler.warmup_steps=5",
]
SGD = ["optimizer=sgd", "optimizer.lr=0.5", "+optimizer.momentum=0.9"]
ADAM = ["optimizer=adam", "optimizer.lr=0.01"]
N = 70  # not a multiple of 4, in epoch 1


def fit(make_cfg, out: Path, k: int, *overrides: str) -> dict:
    """train(cfg) of the small run at steps_per_call=k, in `out`; its summary."""
    return train(make_cfg(*SMALL, *overrides, f"steps_per_call={k}", out=out))


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def step_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv that StepMetrics wrote: step, epoch, train/loss, train/grad_norm."""
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    keys = ("step", "epoch", "train/loss", "train/grad_norm")
    return [{k: r[k] for k in keys} for r in rows if r.get("train/loss")]


# --- 1. bit-identical weights -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        ["model=fused"],
        ["model=fused", "model.num_layers=2", "model.dropout=0.2"],
        ["model=torch", "model.num_layers=2", "model.dropout=0.2"],
        ["model=scratch"],
    ],
    ids=["fused1", "fused2-dropout", "torch2-dropout", "scratch1"],
)
@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd-momentum", "adam"])
def test_k4_trains_bit_identical_weights_to_k1(make_cfg, tmp_path, corpus_path, model, optimizer):
    """K=4 leaves exactly K=1's weights after N steps (no multiple of 4, past an epoch end), scheduler and clip on."""
    args = [*model, *optimizer, *COSINE, f"trainer.max_steps={N}"]
    one, four = (fit(make_cfg, tmp_path / str(k), k, *args) for k in (1, 4))
    assert one["global_step"] == four["global_step"] == N and one["epochs"] == four["epochs"] == 2
    assert_same_weights(last(tmp_path / "1")["state_dict"], last(tmp_path / "4")["state_dict"])
    # the premise: clipping acted (the norm logged is the one before clipping)
    assert max(float(r["train/grad_norm"]) for r in step_rows(tmp_path / "1")) > 0.1


@pytest.mark.parametrize(
    "clipping",
    [
        ["optimizer=sgd", "optimizer.lr=0.5", "trainer.gradient_clip_algorithm=value"],
        ["optimizer=adam", "optimizer.lr=0.01", "+optimizer.fused=true"],  # clipped through Lightning's own layers
    ],
    ids=["by-value", "fused-adam"],
)
def test_k4_clips_as_k1_by_value_and_through_lightning(make_cfg, tmp_path, corpus_path, clipping):
    """The module's clipping (steps.clip_gradients: torch's call, or Lightning's for an optimizer that unscales
    itself) leaves K=1's weights for clipping by value, and for a fused Adam."""
    args = ["model=fused", *clipping, "trainer.max_steps=10"]
    for k in (1, 4):
        fit(make_cfg, tmp_path / str(k), k, *args)
    assert_same_weights(last(tmp_path / "1")["state_dict"], last(tmp_path / "4")["state_dict"])


def test_k4_runs_every_per_step_hook_as_k1_does_directly_or_through_lightnings_layers(make_cfg, tmp_path, corpus_path):
    """Each step's on_before_backward, on_after_backward and on_before_optimizer_step, in Lightning's order, at its
    global_step, with its name set: at K=4 called directly (one device, no profiler) and through Lightning's own
    layers (a profiler on), as at K=1; and the weights of both are K=1's."""
    args = ["model=fused", *SGD, *COSINE, "trainer.max_steps=10"]
    runs = {"1": (1, []), "4": (4, []), "4-layers": (4, ["+trainer.profiler=simple"])}
    calls = {}
    for name, (k, extra) in runs.items():
        record = [
            "+callbacks.hooks._target_=helpers.mid_chunk.HookOrder",
            f"+callbacks.hooks.path={tmp_path}/{name}.json",
        ]
        fit(make_cfg, tmp_path / name, k, *args, *record, *extra)
        calls[name] = json.loads((tmp_path / f"{name}.json").read_text())
    hooks = ["on_before_backward", "on_after_backward", "on_before_optimizer_step"]
    assert calls["1"]["calls"] == [[h, step, h] for step in range(10) for h in hooks]
    assert calls["4"]["calls"] == calls["1"]["calls"] and calls["4-layers"]["calls"] == calls["1"]["calls"]
    through = {name: c["through_lightning"] for name, c in calls.items()}
    assert through == {"1": [True], "4": [False], "4-layers": [True]}
    for name in ("4", "4-layers"):
        assert_same_weights(last(tmp_path / "1")["state_dict"], last(tmp_path / name)["state_dict"])


# --- 2. mid-epoch resume ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization and every_n_train_steps")
@pytest.mark.parametrize(
    ("resume_k", "total"),
    [(4, ["+scheduler.total_steps=90"]), (4, [])],
    ids=["k4-total-given", "k4-total-of-the-run"],
)
def test_k4_checkpoint_mid_epoch_resumed_ends_as_uninterrupted_k1(make_cfg, tmp_path, corpus_path, resume_k, total):
    """A K=4 run's mid-epoch checkpoint (step 70 of epoch 1), resumed to step 90 at K=4, is the K=1 run."""
    args = ["model=fused", "model.num_layers=2", "model.dropout=0.2", *SGD, *COSINE, *total, "trainer.max_steps=90"]
    mid = [
        "+callbacks.mid._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.mid.dirpath=${paths.output_dir}/mid",
        "+callbacks.mid.filename=mid",
        "+callbacks.mid.every_n_train_steps=70",  # 70 is a chunk's end: 62 + 2 x 4
        "+callbacks.mid.save_on_train_epoch_end=false",
    ]
    fit(make_cfg, tmp_path / "full", 1, *args)
    fit(make_cfg, tmp_path / "cut", 4, *args, *mid)
    ckpt = tmp_path / "cut" / "mid" / "mid.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 70)  # the premise: mid-epoch, inside a K=4 run
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 70 - PER_EPOCH}]
    resumed = fit(make_cfg, tmp_path / "b", resume_k, *args, f"ckpt_path={ckpt}")
    assert (resumed["status"], resumed["global_step"]) == ("completed", 90)
    full, after = last(tmp_path / "full"), last(tmp_path / "b")
    # the resumed run took the 20 steps left, to the uninterrupted run's schedule, epoch and loader position
    assert after["lr_schedulers"][0]["last_epoch"] == full["lr_schedulers"][0]["last_epoch"] == 90
    assert after["epoch"] == full["epoch"] == 1
    assert after["loops"]["fit_loop"]["state_dict"] == full["loops"]["fit_loop"]["state_dict"]
    assert_same_weights(full["state_dict"], after["state_dict"])


def test_a_checkpoint_resumed_with_another_steps_per_call_is_one_line_and_exit_2(capfd, tmp_path):
    """Lightning's loops count calls (and manual optimization its own steps): another K is refused, the file kept."""
    run = tmp_path / "a"
    first = [*TINY, "steps_per_call=4", "trainer.max_steps=8", f"hydra.run.dir={run}"]
    code, out = run_main(capfd, "gruexp.train", *first)
    assert code == 0, out
    ckpt = run / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    args = [*TINY, "steps_per_call=1", "trainer.max_steps=16", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}"]
    code, out = run_main(capfd, "gruexp.train", *args)
    message = f"{ckpt} was trained with steps_per_call=4, this run has steps_per_call=1: resume with steps_per_call=4"
    assert code == 2
    assert_one_line_error(code, out, message)
    assert ckpt.read_bytes() == before


# --- 3. SIGTERM inside a chunk ----------------------------------------------------------------------------------------


def test_sigterm_inside_a_chunk_stops_at_its_end_and_resumes_as_uninterrupted_k1(make_cfg, tmp_path, corpus_path):
    """SIGTERM before step 64 (chunk 62..65): K=4 stops after the chunk, last.ckpt at 66; resumed, it is K=1's run."""
    args = ["model=fused", *SGD, *COSINE, "+scheduler.total_steps=90", "trainer.max_steps=90"]
    kill = ["+callbacks.kill._target_=helpers.mid_chunk.SignalBeforeStep", "+callbacks.kill.step=64"]
    fit(make_cfg, tmp_path / "full", 1, *args)
    with pytest.raises(SystemExit) as e:
        fit(make_cfg, tmp_path / "a", 4, *args, *kill)
    assert e.value.code == 128 + 15
    cut = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (cut["status"], cut["global_step"]) == ("interrupted", 66)
    saved = last(tmp_path / "a")
    assert (saved["epoch"], saved["global_step"]) == (1, 66)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 66 - PER_EPOCH}]
    resumed = fit(make_cfg, tmp_path / "b", 4, *args, f"ckpt_path={tmp_path / 'a'}")
    assert (resumed["status"], resumed["global_step"]) == ("completed", 90)
    assert_same_weights(last(tmp_path / "full")["state_dict"], last(tmp_path / "b")["state_dict"])
    assert step_rows(tmp_path / "b") == step_rows(tmp_path / "full")  # the CSV history goes on at the right step


# --- 4. DDP -----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_at_k4_trains_bit_identical_weights_to_k1(tmp_path, corpus_path):
    """2-process gloo DDP at K=4 leaves exactly the weights of 2-process DDP at K=1 (N steps, past an epoch end)."""
    ddp = [*TINY, *SMALL, "model=torch", *SGD, *COSINE, f"trainer.max_steps={N}", "trainer.devices=2"]
    for k in (1, 4):
        args = [*ddp, "+trainer.strategy=ddp", f"steps_per_call={k}", f"hydra.run.dir={tmp_path / str(k)}"]
        r = run_cli("gruexp.train", *args, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((tmp_path / str(k) / "summary.json").read_text())
        assert (summary["world_size"], summary["global_step"]) == (2, N)
    assert_same_weights(last(tmp_path / "1")["state_dict"], last(tmp_path / "4")["state_dict"])


# --- 5. divergence inside a chunk -------------------------------------------------------------------------------------


def test_divergence_inside_a_chunk_is_diverged_at_k1s_step_and_saves_nothing_after(make_cfg, tmp_path, corpus_path):
    """NaN weights after step 63: K=4 (chunk 62..65) says K=1's diverged step 64; no checkpoint is from after it."""
    nan = ["+callbacks.nan._target_=helpers.mid_chunk.NanGradsAt", "+callbacks.nan.step=63"]
    errors = []
    for k in (1, 4):
        with pytest.raises(Diverged):
            fit(make_cfg, tmp_path / str(k), k, "model=fused", *SGD, *nan)
        summary = json.loads((tmp_path / str(k) / "summary.json").read_text())
        assert summary["status"] == "diverged" and "at step 64 (epoch 1)" in summary["error"]
        errors.append(summary["error"])
        ckpts = sorted((tmp_path / str(k)).rglob("*.ckpt"))
        assert [p.name for p in ckpts] == ["best.ckpt", "last.ckpt"]  # epoch 0's, before the bad step
        for p in ckpts:
            saved = torch.load(p, weights_only=True)
            assert saved["global_step"] == PER_EPOCH
            assert all(torch.isfinite(w).all() for w in saved["state_dict"].values())
    assert errors[0] == errors[1]


# --- 6. the same train/loss -------------------------------------------------------------------------------------------


def test_k4_logs_the_train_loss_rows_of_k1(make_cfg, tmp_path, corpus_path):
    """metrics.csv's train/loss (and grad norm) rows: the same steps and values at K=4 as at K=1, also inside chunks."""
    args = ["model=fused", *SGD, *COSINE, f"trainer.max_steps={N}", "trainer.log_every_n_steps=3"]
    for k in (1, 4):
        fit(make_cfg, tmp_path / str(k), k, *args)
    one, four = step_rows(tmp_path / "1"), step_rows(tmp_path / "4")
    assert [r["step"] for r in one] == [str(s) for s in range(2, N, 3)]  # steps 2, 5, 8, ..: most inside a chunk
    assert four == one


# --- 7. bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["trainer.accumulate_grad_batches=2", "steps_per_call=4"],
            "trainer.accumulate_grad_batches=2 does not combine with steps_per_call=4: use steps_per_call=1, or a "
            "larger data.batch_size instead of accumulating",
        ),
        (
            ["trainer.val_check_interval=10", "steps_per_call=4"],
            "trainer.val_check_interval=10 batches must be a multiple of steps_per_call=4 (validation runs between "
            "calls)",
        ),
        (["steps_per_call=0"], "steps_per_call must be an integer >= 1 or auto, got 0"),
        (["steps_per_call=1.5"], "steps_per_call must be an integer >= 1 or auto, got 1.5"),
        (["steps_per_call=true"], "steps_per_call must be an integer >= 1 or auto, got True"),
        (["cuda_graph=maybe"], "cuda_graph must be auto, true or false, got 'maybe'"),
        (
            ["trainer.accelerator=cpu", "cuda_graph=true"],
            "cuda_graph=true needs a CUDA device (trainer.accelerator=gpu): use cuda_graph=auto or false",
        ),
    ],
    ids=["accumulate", "val_check_interval", "zero", "float", "bool", "cuda_graph-maybe", "cuda_graph-on-cpu"],
)
def test_a_step_engine_value_it_cannot_take_is_one_line_and_exit_2(capfd, tmp_path, args, message):
    """steps_per_call / cuda_graph values the engine cannot run: exit 2, the one line, a failed summary."""
    code, out = run_main(capfd, "gruexp.train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert_one_line_error(code, out, message)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


# --- 8. the last, short chunk -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "steps"),
    [
        (["trainer.max_steps=30"], 30),  # the 8th chunk trains 2 of its 4 batches
        (["trainer.limit_train_batches=10"], 30),  # chunks of 4, 4, 2 batches an epoch, 3 epochs
        (["trainer.limit_train_batches=0.1"], 18),  # int(62 x 0.1) = 6 batches: chunks of 4, 2
    ],
    ids=["max_steps", "limit_int", "limit_fraction"],
)
def test_a_short_last_chunk_trains_k1s_steps_and_weights(make_cfg, tmp_path, corpus_path, args, steps):
    """max_steps or limit_train_batches not a multiple of K: K=4 takes exactly K=1's steps to K=1's weights."""
    common = ["model=fused", *SGD, *COSINE, *args]
    for k in (1, 4):
        assert fit(make_cfg, tmp_path / str(k), k, *common)["global_step"] == steps
    one, four = last(tmp_path / "1"), last(tmp_path / "4")
    assert four["global_step"] == one["global_step"] == steps
    assert_same_weights(one["state_dict"], four["state_dict"])
    # the batches the loader counts as trained (where a resume would go on): the untrained rest of a chunk not
    loaders = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"] for c in (one, four)]
    assert loaders[0] == loaders[1]
