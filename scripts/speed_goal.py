"""Issue 22's speed goal: a model's training images/s from this checkout against an older one,
in fresh processes taking turns (docs/speed.md, "The goal").

    git worktree add /tmp/before a67a110          # the code before the speed levers
    OMP_NUM_THREADS=2 .venv/bin/python scripts/speed_goal.py /tmp/before s4d trellisnet \
        --rounds 5 --compile trellisnet

Each figure is one process: the model at its default input (batch 64), AdamW, 2 warm-up steps,
then the median of 5 timed steps. "now" is this checkout with the allocator setting its processes
apply (`cores.keep_freed_memory`); "before" is the other checkout as it ran, with glibc's default.
Each round times before, now (and now compiled, for the models named by --compile) in turn; the
speed-up printed at the end is the median over rounds of now ÷ before. Read it only from a quiet
machine. Both sides run the same step below (not `bench`'s helpers, which an older checkout may
lack): it needs only `seqlstm.model_input` and `create_model` there."""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def one(repo, name, which, compiled, batch, steps):
    """Training images/s of `name` from the checkout `repo`, in this process."""
    sys.path.insert(0, str(repo))
    import torch

    import seqlstm

    if which == "now":
        from seqlab import cores

        cores.keep_freed_memory()
    torch.manual_seed(0)
    x, n_feat, model_args = seqlstm.model_input(name, batch)
    model = seqlstm.create_model(name, in_features=n_feat, num_classes=10, **model_args)
    if compiled:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def measure(repo, name, which, compiled, args):
    """one() in a fresh process; its images/s."""
    cmd = [sys.executable, __file__, "--one", str(repo), name, which, str(int(compiled)),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", nargs="?", help="the older checkout")
    ap.add_argument("models", nargs="*", default=["s4d", "trellisnet"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", nargs="*", default=[], help="models also timed compiled")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--one", nargs=4, metavar=("REPO", "MODEL", "WHICH", "COMPILED"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        repo, name, which, compiled = args.one
        print(one(repo, name, which, compiled == "1", args.batch, args.steps))
        return
    if not args.before or not (Path(args.before) / "seqlstm.py").is_file():
        ap.error(f"before = {args.before!r}: expected a checkout holding seqlstm.py")
    ratios = {}
    for r in range(args.rounds):
        for name in args.models:
            base = measure(args.before, name, "before", False, args)
            print(f"round {r}: {name} before {base:.1f} images/s", flush=True)
            for compiled in (False, True) if name in args.compile else (False,):
                now = measure(HERE, name, "now", compiled, args)
                label = f"{name}{' compiled' if compiled else ''}"
                ratios.setdefault(label, []).append(now / base)
                print(f"round {r}: {label} now {now:.1f} images/s ({now / base:.2f}x)", flush=True)
    for label, rs in ratios.items():
        print(f"{label}: {statistics.median(rs):.2f}x (rounds {', '.join(f'{x:.2f}' for x in rs)})")


if __name__ == "__main__":
    main()
