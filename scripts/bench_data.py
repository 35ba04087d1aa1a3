"""Data pipeline benchmark on a generated English-like corpus, 100 MB by default (results: docs/corpora.md).

    python scripts/bench_data.py [--mb 100] [--tokenizer chars] [--json out.json]

Measures, each in a fresh process where it matters:
1. first encode: the DataModule's set-up with an empty token cache (read, tokenize, write the token file), MB/s;
2. a later run's data set-up: a new process building the same DataModule (hash the source, map the token file);
3. peak RSS of a 1-step training run (`python -m gruexp.train ... trainer.max_steps=1`), first and later run;
4. data loading per batch against one training step at d2l's shape (fused GRU, hidden 256, B 32, T 35), measured
   alternately in one process so machine noise hits both alike.
Targets: encode >= 20 MB/s, later set-up < 2 s, peak RSS < 1.2 GB, loading < 2 % of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource  # noqa: F401  (used in the child processes' code)
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no more out up into do any your what time "
    "machine traveller thing little man seemed came upon through before great hands light very again eloi morlocks"
).split()


def generate(path: Path, mb: int, seed: int = 0) -> None:
    """English-like text: Zipf-distributed words, capitals, punctuation, ~70-character lines, `mb` megabytes."""
    rng = np.random.default_rng(seed)
    vocab = WORDS + ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 11))) for _ in range(5000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    lines = []
    for _ in range(20000):
        words = [vocab[i] for i in rng.choice(len(vocab), rng.integers(8, 16), p=p / p.sum())]
        words[0] = words[0].capitalize()
        lines.append((" ".join(words) + rng.choice([".", ",", ";", "!", "?", ":"])).encode())
    target = mb * 1_000_000
    with open(path, "wb") as f:
        written = 0
        while written < target:
            block = b"\n".join(lines[i] for i in rng.integers(0, len(lines), 20000)) + b"\n"
            block = block[: target - written]
            f.write(block)
            written += len(block)


def child(code: str, env: dict) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


SETUP = """
import json, time, resource
t0 = time.perf_counter()
from gruexp.data import CharDataModule
t1 = time.perf_counter()
dm = CharDataModule(corpus=None, path={path!r}, tokenizer={tok!r}, batch_size=32, num_steps=35, val_tokens=500000)
x, y = next(iter(dm.train_dataloader()))
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "setup_s": t2 - t1, "tokens": len(dm.ids), "vocab": len(dm.vocab),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

LOADING = """
import json, time, torch
from gruexp.data import CharDataModule
from gruexp.models import build_model
dm = CharDataModule(corpus=None, path={path!r}, tokenizer={tok!r}, batch_size=32, num_steps=35)
net = build_model("fused", vocab_size=len(dm.vocab), hidden_size=256)
opt = torch.optim.SGD(net.parameters(), lr=1.0)
it = iter(dm.train_dataloader())
def step(x, y):
    logits, _ = net(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5):
    step(*next(it))
load, train = [], []
for _ in range({rounds}):  # alternate: 20 batches loaded, then 3 steps trained
    t0 = time.perf_counter()
    for _ in range(20):
        b = next(it)
    t1 = time.perf_counter()
    for _ in range(3):
        step(*b)
    t2 = time.perf_counter()
    load.append((t1 - t0) / 20); train.append((t2 - t1) / 3)
load_ms, step_ms = 1e3 * sorted(load)[len(load) // 2], 1e3 * sorted(train)[len(train) // 2]
print(json.dumps({{"load_ms": load_ms, "step_ms": step_ms, "share": load_ms / step_ms}}))
"""


def train_rss(path: Path, tok: str, env: dict, out: Path) -> tuple[float, float]:
    """Peak RSS (MB) and wall time of a 1-step training run in a fresh process."""
    args = [
        sys.executable,
        "-m",
        "gruexp.train",
        "data=file",
        f"data.path={path}",
        f"data.tokenizer={tok}",
        "data.val_tokens=20000",
        "trainer.max_steps=1",
        "+trainer.limit_test_batches=2",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={out}",
    ]
    # a wrapper process whose only child is the run: its RUSAGE_CHILDREN peak is that run's alone
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"the training run failed: {r.stderr[-2000:]}")
    return int(r.stdout.split()[-1]) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--tokenizer", default="chars", choices=["d2l", "chars", "bytes"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        t0 = time.perf_counter()
        generate(corpus, a.mb)
        print(f"generated {corpus.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
        env = {
            **os.environ,
            "XDG_CACHE_HOME": str(tmp / "cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "WANDB_MODE": "offline",
        }
        code = SETUP.format(path=str(corpus), tok=a.tokenizer)
        first = child(code, env)
        mb = corpus.stat().st_size / 1e6
        print(
            f"1. first encode ({a.tokenizer}): {first['setup_s']:.2f} s = {mb / first['setup_s']:.1f} MB/s "
            f"({first['tokens']:,} tokens, vocabulary {first['vocab']}, peak RSS {first['rss_mb']:.0f} MB)"
        )
        later = child(code, env)
        print(
            f"2. later run's data set-up: {later['setup_s']:.2f} s (imports {later['import_s']:.2f} s more), "
            f"peak RSS {later['rss_mb']:.0f} MB"
        )
        cold_env = {**env, "XDG_CACHE_HOME": str(tmp / "cache2")}
        rss_first, wall_first = train_rss(corpus, a.tokenizer, cold_env, tmp / "run1")
        rss_later, wall_later = train_rss(corpus, a.tokenizer, cold_env, tmp / "run2")
        print(
            f"3. peak RSS of a 1-step training run: {rss_first:.0f} MB with the encode ({wall_first:.1f} s), "
            f"{rss_later:.0f} MB later ({wall_later:.1f} s)"
        )
        load = child(LOADING.format(path=str(corpus), tok=a.tokenizer, rounds=a.rounds), env)
        print(
            f"4. data loading {load['load_ms'] * 1e3:.0f} us per batch, training step {load['step_ms']:.2f} ms "
            f"(fused, hidden 256, B 32, T 35): loading = {100 * load['share']:.2f} % of a step"
        )
        results = {
            "mb": mb,
            "tokenizer": a.tokenizer,
            "encode_mb_per_s": mb / first["setup_s"],
            "later_setup_s": later["setup_s"],
            "rss_first_mb": rss_first,
            "rss_later_mb": rss_later,
            "load_ms": load["load_ms"],
            "step_ms": load["step_ms"],
            "load_share": load["share"],
            "loadavg": os.getloadavg(),
        }
        ok = [
            ("encode >= 20 MB/s", results["encode_mb_per_s"] >= 20),
            ("later set-up < 2 s", results["later_setup_s"] < 2),
            ("peak RSS < 1.2 GB", max(rss_first, rss_later) < 1200),
            ("loading < 2 % of a step", results["load_share"] < 0.02),
        ]
        print("targets: " + ", ".join(f"{name} {'ok' if good else 'MISSED'}" for name, good in ok))
        print(f"load average: {' '.join(f'{x:.2f}' for x in results['loadavg'])} on {os.cpu_count()} cores")
        if a.json:
            a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
