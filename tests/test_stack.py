"""Stacked trials (hydra/launcher=stacked, gruexp.stack): each trial is its lone run, to 1e-6, and no other's.

The sweeps run in this process (run_main), as `python -m gruexp.train -m` would: the stacked launcher runs a stack
in the sweep's own process, and the lone runs they are compared with run one after another through Hydra's basic
launcher, each its own `train(cfg)`. Three trials differ in lr, clip and seed, through one swept key (seed) that the
other two read from a list (the test's own resolver `of_seed`): a grid of three values each would be 27 runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_bench
from helpers.runs import TINY, assert_one_line_error, run_cli, run_main
from omegaconf import OmegaConf

from gruexp import preflight, stack
from gruexp.models import build_model, gru_cpu, gru_ops
from gruexp.models.stacked import batchable, forward_all

OmegaConf.register_new_resolver("of_seed", lambda values, seed: values[seed - 1], replace=True)
TRIALS = [
    "seed=1,2,3",
    "+lrs=[0.5,1.0,2.0]",
    "+clips=[0.05,0.5,5.0]",
    "optimizer.lr='${of_seed:${lrs},${seed}}'",
    "trainer.gradient_clip_val='${of_seed:${clips},${seed}}'",
]
RUN = [*TINY, "trainer.max_epochs=1", "logger=csv", "trainer.accelerator=cpu"]
ADAM = ["optimizer=adam", "+lrs=[0.003,0.01,0.03]"]  # after TRIALS: Hydra takes the last value of a key
COMBOS = {
    "scratch-sgd": ["model=scratch"],
    "scratch-adam": ["model=scratch", *ADAM],
    "fused-c-sgd": ["model=fused"],
    "fused-c-2layers-dropout-adam": ["model=fused", "model.num_layers=2", "model.dropout=0.3", *ADAM],
    "fused-ops-2layers-dropout-sgd": ["model=fused", "model.num_layers=2", "model.dropout=0.3"],
    "fused-ops-adam": ["model=fused", *ADAM],
    "torch-2layers-dropout-sgd": ["model=torch", "model.num_layers=2", "model.dropout=0.3"],
}


def sweep(capfd, folder: Path, launcher: str, *overrides: str) -> tuple[int, str]:
    return run_main(
        capfd, "gruexp.train", "-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={folder}", *RUN, *overrides
    )


def weights(job: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    return torch.load(job / "checkpoints" / name, map_location="cpu", weights_only=False)["state_dict"]


def summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    """The same entries, each within rtol of the other's largest magnitude (the largest differences named)."""
    assert a.keys() == b.keys()
    worse = {}
    for k in a:
        scale = float(b[k].double().abs().max()) or 1.0
        rel = float((a[k].double() - b[k].double()).abs().max()) / scale
        if not rel <= rtol:
            worse[k] = rel
    assert not worse, f"relative differences above {rtol}: {worse}"


# --- which jobs stack -------------------------------------------------------------------------------------------


def test_jobs_stack_when_they_differ_in_stackable_values_only():
    def key(*o: str) -> str:
        return stack.group_key(list(o))

    base = ["model.hidden_size=64", "trainer.max_epochs=3"]
    same = [
        key(*base, "optimizer.lr=0.5", "trainer.gradient_clip_val=1", "seed=1", "model.dropout=0.1"),
        key(*base, "optimizer.lr=2", "trainer.gradient_clip_val=0.5", "seed=7", "model.dropout=0.3"),
        key(*base, "optimizer.momentum=0.9", "+optimizer.weight_decay=1e-4", "+scheduler.gamma=0.5"),
        key(*base, "optimizer.betas=[0.8,0.99]"),
        key(*base, "++hydra.job.env_set.GRUEXP_TRIAL='{\"number\": 3}'"),  # Optuna's trial of each job
    ]
    assert len(set(same)) == 1
    for other in (
        ["model.hidden_size=128", "trainer.max_epochs=3"],
        [*base, "model.num_layers=2"],
        [*base, "model=scratch"],
        [*base, "data.batch_size=16"],
        [*base, "trainer.precision=bf16-mixed"],
        [*base, "optimizer=adam"],  # another optimizer class: not a number
    ):
        assert key(*other) != same[0], other
    groups = stack.groups([same[0], key("model.hidden_size=128"), same[0], same[0]], most=2)
    assert groups == [[0, 2], [3], [1]]


# --- the model: each trial's forward, backward and dropout masks ------------------------------------------------

NETS = {
    "scratch": dict(name="scratch"),
    "fused-c": dict(name="fused", num_layers=2, dropout=0.3),
    "fused-ops": dict(name="fused", num_layers=2, dropout=0.3, backend="ops"),
    "torch": dict(name="torch", num_layers=2, dropout=0.3),
}
BATCHED = {"scratch": "scratch", "fused-c": "c", "fused-ops": "ops", "torch": None}  # how forward_all runs them


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-mixed"])
@pytest.mark.parametrize("kind", NETS)
def test_forward_all_is_each_trials_own_forward_backward_and_dropout(kind, autocast):
    """Each trial's logits, state and gradients are its own net's; under bf16 autocast too, where the batched
    recurrences run in fp32 as a lone net's do (a bf16 input reached the C loop as raw float32 once)."""
    # bf16 products accumulate in another order batched than alone: gradients within bf16's tolerances
    tolerance = dict(rtol=1.6e-2, atol=1e-5) if autocast else dict(rtol=1e-6, atol=1e-9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _forward_all_is_each_trials_own(kind, tolerance)


def _forward_all_is_each_trials_own(kind: str, tolerance: dict[str, float]) -> None:
    torch.manual_seed(0)
    nets = [build_model(vocab_size=28, hidden_size=16, **NETS[kind]) for _ in range(3)]
    tokens = [torch.randint(0, 28, (4, 9)) for _ in range(3)]
    layers = nets[0].num_layers
    states = [None, torch.randn(layers, 4, 16), None]
    seeds = {i: torch.Generator().manual_seed(10 + i).get_state() for i in range(3)}
    rngs = dict(seeds)

    @contextlib.contextmanager
    def rng(i: int):
        torch.set_rng_state(rngs[i])
        yield
        rngs[i] = torch.get_rng_state()

    assert batchable(nets, tokens) == BATCHED[kind]
    together = forward_all(nets, tokens, states, rng)
    torch.autograd.backward([logits.square().mean() for logits, _ in together])
    grads = [[p.grad.clone() for p in net.parameters()] for net in nets]
    for i, net in enumerate(nets):
        net.zero_grad()
        torch.set_rng_state(seeds[i])
        logits, state = net(tokens[i], states[i])
        logits.square().mean().backward()
        assert torch.equal(logits, together[i][0]) and torch.equal(state, together[i][1])
        for p, g in zip(net.parameters(), grads[i], strict=True):
            torch.testing.assert_close(g, p.grad, **tolerance)
        assert torch.equal(torch.get_rng_state(), rngs[i])  # its generator moved as its lone forward moved it


@pytest.mark.skipif(gru_cpu.load() is None, reason="no C compiler here")
def test_c_loop_runs_trials_side_by_side_as_each_alone():
    torch.manual_seed(0)
    S, T, B, H, V = 3, 7, 4, 32, 28
    table, h0 = torch.randn(S, V, 3 * H), torch.randn(S, B, H)
    w_hh, b_hh, ids = torch.randn(S, 3 * H, H) * 0.1, torch.randn(S, 3 * H), torch.randint(0, V, (S, T, B))
    hs, saved = gru_cpu.forward_trials(table, h0, w_hh, b_hh, ids, save=True)
    dhs, dh_T = torch.randn(S, T, B, H), torch.randn(S, B, H)
    grads = gru_cpu.backward_trials(dhs, dh_T, saved, V, need_dh0=True)
    for s in range(S):
        alone, kept = gru_cpu.forward(table[s], h0[s], w_hh[s], b_hh[s], ids[s], True, save=True)
        assert torch.equal(alone, hs[s])
        for g, g_alone in zip(grads, gru_cpu.backward(dhs[s], dh_T[s], kept, True, V, True), strict=True):
            assert torch.equal(g[s], g_alone)


@pytest.mark.parametrize("tables", [True, False], ids=["token-tables", "projections"])
def test_op_loop_runs_trials_in_one_step_as_each_alone(tables):
    """gru_ops with a trial dimension (what a stack of fused trials runs on a GPU): each trial's outputs and
    gradients bit for bit its own call's, from the token tables (layer 0) and from projections (layers above)."""
    torch.manual_seed(0)
    S, T, B, H, V = 3, 7, 4, 32, 28
    gi = torch.randn(S, V, 3 * H) if tables else torch.randn(T, S, B, 3 * H)
    ids = torch.randint(0, V, (T, S, B)) if tables else None
    h0, w_hh, b_hh = torch.randn(S, B, H), torch.randn(S, 3 * H, H) * 0.1, torch.randn(S, 3 * H)
    hs, saved = gru_ops.forward(gi, h0, w_hh, b_hh, ids, True, save=True)
    dhs, dh_T = torch.randn(T, S, B, H), torch.randn(S, B, H)
    grads = gru_ops.backward(dhs, dh_T, saved, True, V, need_dh0=True)
    for s in range(S):
        own = (gi[s], ids[:, s].contiguous()) if tables else (gi[:, s].contiguous(), None)
        alone, kept = gru_ops.forward(own[0], h0[s], w_hh[s], b_hh[s], own[1], True, save=True)
        assert torch.equal(alone, hs[:, s])
        grads_alone = gru_ops.backward(dhs[:, s].contiguous(), dh_T[s], kept, True, V, True)
        for k, (g, g_alone) in enumerate(zip(grads, grads_alone, strict=True)):
            assert torch.equal(g[:, s] if k == 0 and not tables else g[s], g_alone), k


# --- whole runs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS)
def test_each_stacked_trial_ends_with_its_lone_runs_weights(capfd, tmp_path, corpus_path, monkeypatch, combo):
    if "-ops-" in combo:
        monkeypatch.setenv("GRUEXP_FUSED_CPU", "ops")  # fused's torch-op loop, which GPUs run
    code, out = sweep(capfd, tmp_path / "stacked", "stacked", *TRIALS, *COMBOS[combo])
    assert code == 0, out
    assert "stack of jobs 0,1,2 started" in out  # one stack, not three jobs
    code, out = sweep(capfd, tmp_path / "lone", "basic", *TRIALS, *COMBOS[combo])
    assert code == 0, out
    for k in range(3):
        stacked, lone = tmp_path / "stacked" / str(k), tmp_path / "lone" / str(k)
        assert summary(stacked)["status"] == "completed" and summary(stacked)["seed"] == k + 1
        assert summary(stacked)["lr"] == summary(lone)["lr"]
        assert summary(stacked)["global_step"] == summary(lone)["global_step"] > 0
        assert_close_weights(weights(stacked), weights(lone))
        assert summary(stacked)["val_ppl"] == pytest.approx(summary(lone)["val_ppl"], rel=1e-6)
    # each a run of its own: its folder holds what a lone run's does
    for name in ("summary.json", "ppl.png", "train.log", ".hydra/overrides.yaml", "checkpoints/best.ckpt", "csv"):
        assert (tmp_path / "stacked" / "1" / name).exists(), name
    assert "seed=2" in (tmp_path / "stacked" / "1" / ".hydra" / "overrides.yaml").read_text()
    assert "/stacked/1" in (tmp_path / "stacked" / "1" / "train.log").read_text()
    assert "/stacked/2" not in (tmp_path / "stacked" / "1" / "train.log").read_text()


def test_a_diverging_trial_ends_alone_and_the_others_train_as_without_it(capfd, tmp_path, corpus_path):
    nan = ["+callbacks.nan._target_=helpers.mid_chunk.NanGradsAt", "+callbacks.nan.step=3"]
    nan += ["+callbacks.nan.seed=${seed}", "+callbacks.nan.only_seed=2"]
    code, out = sweep(capfd, tmp_path / "three", "stacked", *TRIALS, *nan)
    assert code != 0  # the sweep says a job diverged
    assert "stack of jobs 0,1,2 started" in out
    assert [summary(tmp_path / "three" / str(k))["status"] for k in range(3)] == ["completed", "diverged", "completed"]
    two = [t.replace("seed=1,2,3", "seed=1,3") for t in TRIALS]
    code, out = sweep(capfd, tmp_path / "two", "stacked", *two, *nan)
    assert code == 0, out
    for k, j in ((0, 0), (2, 1)):  # bit for bit as if the diverging trial had not been there
        a, b = weights(tmp_path / "three" / str(k)), weights(tmp_path / "two" / str(j))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_sigterm_interrupts_every_trial_and_ckpt_path_last_resumes_each_exactly(capfd, tmp_path, corpus_path):
    longer = ["trainer.max_epochs=2", "model=fused", "model.num_layers=2", "model.dropout=0.3"]
    code, out = sweep(capfd, tmp_path / "whole", "stacked", *TRIALS, *longer)
    assert code == 0, out
    kill = ["+callbacks.kill._target_=helpers.mid_chunk.SignalBeforeStep", "+callbacks.kill.step=40"]
    kill += ["+callbacks.kill.seed=${seed}", "+callbacks.kill.only_seed=3"]
    previous = signal.getsignal(signal.SIGTERM)
    code, out = sweep(capfd, tmp_path / "cut", "stacked", *TRIALS, *longer, *kill)
    assert signal.getsignal(signal.SIGTERM) is previous  # the stack gave the process its handler back
    assert code != 0
    steps = summary(tmp_path / "whole" / "0")["global_step"]
    for k in range(3):
        cut = summary(tmp_path / "cut" / str(k))
        assert cut["status"] == "interrupted" and 0 < cut["global_step"] < steps
        assert (tmp_path / "cut" / str(k) / "checkpoints" / "last.ckpt").is_file()
    code, out = sweep(capfd, tmp_path / "resumed", "stacked", *TRIALS, *longer, *kill, "ckpt_path=last")
    assert code == 0, out
    for k in range(3):
        resumed = tmp_path / "resumed" / str(k)
        assert summary(resumed)["status"] == "completed"
        assert f"{tmp_path / 'cut' / str(k)}" in (resumed / "train.log").read_text()  # its own checkpoint
        assert_close_weights(weights(resumed), weights(tmp_path / "whole" / str(k)))
    # a trial's checkpoint is any run's: resumed alone (with the stack's K), it ends as the stacked trial did
    alone = [o for o in (*RUN, *longer) if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=2"]
    alone += ["seed=1", "optimizer.lr=0.5", "trainer.gradient_clip_val=0.05", "steps_per_call=16"]
    code, out = run_main(capfd, "gruexp.train", f"hydra.run.dir={tmp_path / 'alone'}", *alone,
                         f"ckpt_path={tmp_path / 'cut' / '0'}")  # fmt: skip
    assert code == 0, out
    assert_close_weights(weights(tmp_path / "alone"), weights(tmp_path / "whole" / "0"))
    code, out = run_main(capfd, "gruexp.generate", f"ckpt_path={tmp_path / 'resumed' / '2'}", "num_chars=5")
    assert code == 0 and "time traveller" in out, out


# --- bad input: one line, exit 2, nothing started ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["hydra/launcher=stacked", "optimizer.lr=1"], "this is one run: add -m and the values to sweep"),
        (["-m", "hydra.launcher.trials=2", "optimizer.lr=1,2"], "add hydra/launcher=stacked to stack"),
        (["-m", "hydra/launcher=stacked", "hydra.launcher.trials=0", "optimizer.lr=1,2"], "trials=0 must be"),
        (
            ["hparams_search=optuna", "hydra/launcher=stacked", "hydra.sweeper.n_jobs=1"],
            "hydra.sweeper.n_jobs=1 asks Optuna for one trial at a time",
        ),
    ],
)
def test_a_stack_setting_where_nothing_can_stack_is_one_line(tmp_path, corpus_path, args, message):
    done = run_cli("gruexp.train", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done.returncode, done.stdout + done.stderr, message)
    assert done.returncode == 2
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()


def test_a_stack_too_large_for_memory_is_refused_before_training(capfd, tmp_path, corpus_path, make_cfg, monkeypatch):
    need = preflight.check_memory(make_cfg(*RUN[len(TINY) :]), vocab_size=28)  # one trial's, as the sweep's are
    monkeypatch.setattr(preflight, "available_memory", lambda on_gpu: int(2.5 * need))
    code, out = sweep(capfd, tmp_path / "sweep", "stacked", "seed=1,2,3")
    assert code != 0
    assert "a stack of 3 trials of model.hidden_size=16 needs about" in out
    assert "lower hydra.launcher.trials (to 2 or fewer) or model.hidden_size" in out
    for k in range(3):
        assert summary(tmp_path / "sweep" / str(k))["status"] == "failed"
        assert not (tmp_path / "sweep" / str(k) / "checkpoints").exists()


def test_bench_stack_times_both_sweeps_and_checks_their_jobs_agree(capsys, tmp_path, corpus_path):
    out = tmp_path / "bench.json"
    args = ["--hidden-sizes", "16", "--lrs", "0.5,1", "--clips", "1", "--epochs", "1", "--max-tokens", "3000"]
    done = run_bench(*args, "--json", str(out), script="bench_stack.py")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["jobs"] == 2 and "experiment=d2l_classic" in report["setting"]
    size = report["sizes"]["16"]
    assert len(size["local"]) == len(size["stacked"]) == 1 and size["val_ppl_agree"] is True
    assert size["ratio"] == pytest.approx(size["local"][0] / size["stacked"][0])
    assert "H16: one after another" in done.stdout
    import bench_stack  # in this process: the refusal comes before any sweep starts

    with pytest.raises(SystemExit) as refused:
        bench_stack.main([*args, "--json", str(out)])
    assert refused.value.code == 2 and "exists and would be overwritten" in capsys.readouterr().err
    per_hour = tmp_path / "per_hour.json"
    done = run_bench(*args, "--stack-of", "2", "--json", str(per_hour), "optimizer.lr=0.5", script="bench_stack.py")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(per_hour.read_text())
    assert report["setting"][-1] == "optimizer.lr=0.5"  # overrides reach every sweep
    size = report["sizes"]["16"]
    assert size["trials_per_hour_ratio"] == pytest.approx(2 * size["alone"][0] / size["stacked"][0])
    assert "x the trials per hour" in done.stdout


def test_each_trial_logs_to_a_wandb_run_of_its_own_in_the_sweeps_group(capfd, tmp_path, corpus_path):
    from gruexp.tracking import offline_runs, read_run

    overrides = [o for o in RUN if o != "logger=csv"]
    code, out = run_main(capfd, "gruexp.train", "-m", "hydra/launcher=stacked", f"hydra.sweep.dir={tmp_path / 's'}",
                         *overrides, "seed=1,2", "logger=wandb")  # fmt: skip
    assert code == 0, out
    runs = [read_run(offline_runs(tmp_path / "s" / str(k))[0]) for k in range(2)]
    assert runs[0]["run"]["id"] != runs[1]["run"]["id"] and {r["run"]["group"] for r in runs} == {"s"}
    for k, run in enumerate(runs):
        assert run["summary"]["val/ppl"]["last"] == pytest.approx(summary(tmp_path / "s" / str(k))["val_ppl"], rel=1e-6)


def test_stacks_side_by_side_run_each_in_a_process_of_its_own(tmp_path, corpus_path):
    done = run_cli(
        "gruexp.train", "-m", "hydra/launcher=stacked", "hydra.launcher.array_parallelism=2",
        f"hydra.sweep.dir={tmp_path / 's'}", *RUN, "model.hidden_size=16,24", "seed=1,2",
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "stack of jobs 0,1 started" in out and "stack of jobs 2,3 started" in out
    for k, hidden in enumerate((16, 16, 24, 24)):
        s = summary(tmp_path / "s" / str(k))
        assert s["status"] == "completed" and s["hidden_size"] == hidden and s["seed"] == 1 + k % 2
    ids = [yaml.safe_load((tmp_path / "s" / str(k) / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
           for k in range(4)]  # fmt: skip
    processes = [i.rsplit("_", 1)[0] for i in ids]  # submitit's job id, then the trial's index
    assert processes[0] == processes[1] != processes[2] == processes[3]


def test_optuna_batches_train_as_stacks_and_the_study_gets_each_trials_value(capfd, tmp_path, corpus_path):
    import optuna

    from gruexp.studies import TRIAL_ENV, open_storage

    folder = tmp_path / "study"
    code, out = run_main(capfd, "gruexp.train", "hparams_search=optuna", "hydra/launcher=stacked",
                         "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=6", "hydra.sweeper.study_name=stacked",
                         f"hydra.sweep.dir={folder}", *RUN)  # fmt: skip
    assert code == 0, out
    assert "stack of jobs 0,1,2,3,4,5 started" in out  # RUN fixes the hidden size: lr and clip are searched
    assert TRIAL_ENV not in os.environ  # the trials' hydra.job.env_set left the sweep's process as it was
    study = optuna.load_study(study_name="stacked", storage=open_storage(str(folder / "optuna.journal")))
    values = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(values) == 6
    for k, value in values.items():
        assert value == pytest.approx(summary(folder / str(k))["val_ppl"], rel=1e-6)


def test_a_pruned_trial_leaves_its_stack_and_the_others_train_on(capfd, tmp_path, corpus_path):
    # the fixed model.hidden_size (RUN's) leaves lr and clip to search: the batch of 6 is one stack. ThresholdPruner
    # prunes a trial at the first validation whose val/ppl is above `upper`; TPE's seeded draws put some above 21
    folder = tmp_path / "study"
    pruner = "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, upper: 21.0}"
    three_epochs = [*[o for o in RUN if not o.startswith("trainer.max_epochs")], "trainer.max_epochs=3"]
    code, out = run_main(capfd, "gruexp.train", "hparams_search=optuna", "hydra/launcher=stacked", pruner,
                         "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=6", f"hydra.sweep.dir={folder}",
                         *three_epochs)  # fmt: skip
    assert code == 0, out
    assert "stack of jobs 0,1,2,3,4,5 started" in out
    trials = [summary(folder / str(k)) for k in range(6)]
    pruned = [t for t in trials if t["status"] == "pruned"]
    completed = [t for t in trials if t["status"] == "completed"]
    assert pruned and completed and len(pruned) + len(completed) == 6
    # a pruned trial stopped costing its share; the others trained on to the end
    assert all(t["epochs"] < 3 for t in pruned) and all(t["epochs"] == 3 for t in completed)
    assert max(t["global_step"] for t in pruned) < min(t["global_step"] for t in completed)
