"""SAE training-step speed: topk against relu-l1, against overcomplete's TopK SAE, relu-l1 against the floor, and
batchtopk and matryoshka against topk.

All cases at 512 inputs, 4,096 latents, k = 32, batch 1,024, float32, on ``--device`` (CPU by default), measured in
the same run on the same batch. A *step* is: ``sae(x).loss``, ``zero_grad``, ``backward``, the optimiser step and
``sae.after_step()``.
Every case, the peer library's and the floors included, uses the same optimiser: ``torch.optim.Adam`` with
``fused=True`` as convlens's SAE trainer builds it (``--adam default`` for torch's default for-loop Adam, about
4x slower on CPU), so the optimiser costs the same everywhere and no ratio depends on that choice of trainer.
The trainer's own bookkeeping (loss sync, fired latents, metric sums) is not part of a step; when
``convlens.sae.training.training_step`` exists, a topk and a relu-l1 step through it are printed as
information.

- topk (``aux_k=0``) against relu-l1 (default parameters: untied, with biases, no clip). Target: <= 0.7x.
- topk against the peer library overcomplete's ``overcomplete.sae.TopKSAE(512, nb_concepts=4096, top_k=32)``
  with its default encoder (the registered ``"linear"`` encoder: one ``nn.Linear(512, 4096)`` with bias, no norm
  layer, then ReLU, then top-k on the dense codes) and its default ``DictionaryLayer`` (l2-normalised atoms, no
  multiplier), trained as in its README: ``z_pre, z, x_hat = sae(x)``, the MSE ``(x - x_hat).square().mean()``,
  backward, Adam step. Target: topk >= 2x its steps per second. ``train_sae`` also clips the gradient norm
  (``clip_grad=1.0``); that variant is printed as information only. overcomplete 0.3.0 calls
  ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9) at import, so this script aliases it to
  ``matplotlib.colormaps.get_cmap`` before importing overcomplete; nothing in convlens does.
- relu-l1 against the floor: the bare dense matmuls of a two-matrix SAE, ``(x @ W_enc.T) @ W_dec`` with
  ``W_enc, W_dec`` of shape ``[4096, 512]``, the sum of squared errors, backward to both matrices (five matmuls,
  as in relu-l1: x takes no gradient). No ReLU, no biases, no L1 term. The primary floor adds the same Adam step
  over the two matrices ("matmuls+adam"; target: relu-l1 <= 1.15x); the floor without any optimiser step
  ("matmuls") and the floor with a ReLU between the matmuls ("matmuls+relu+adam") are printed too.
- batchtopk (``aux_k=0``, the same k: the k x 1,024 largest of the batch) and matryoshka (``aux_k=0``, the same k,
  its default five prefixes and BatchTopK activation) against topk. Target: each <= 1.2x. matryoshka with the TopK
  activation is printed as information.
- information: topk with AuxK (``aux_k=256``, a quarter of the latents forced dead through
  ``samples_since_fired``) against plain topk, and jumprelu (default parameters) against relu-l1.

Every figure is the mean step time of the best of ``--repeats`` rounds of ``--steps`` steps (the cases taking
turns within each round, after ``--warmup`` steps each), so a busy machine does not decide a ratio; short rounds
and more of them filter bursts of other load better than long ones. The share of the CPUs other processes used
during the rounds is printed too (Linux): with as many threads as cores, other load makes every parallel op wait
on a descheduled thread, and the ratios then mean little. Exit status 1 if a target is missed.

    python benchmarks/sae_step.py [--device cpu] [--threads 2] [--steps 5] [--repeats 10] [--no-overcomplete]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

import convlens

TARGETS = {
    "topk_vs_relu_l1": 0.7,
    "topk_vs_overcomplete": 2.0,
    "relu_l1_vs_floor": 1.15,
    "batchtopk_vs_topk": 1.2,
    "matryoshka_vs_topk": 1.2,
}


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used (Linux ``/proc/stat``), or None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def import_overcomplete():
    """overcomplete's TopKSAE class, or the reason it cannot be used."""
    try:
        import matplotlib
        import matplotlib.cm

        if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3.0 calls it at import; benchmark-only shim
            matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
        import overcomplete
        from overcomplete.sae import TopKSAE
    except Exception as exc:  # noqa: BLE001 - any failure means "not measured", with the reason
        return None, f"{type(exc).__name__}: {exc}"
    return TopKSAE, overcomplete.__version__


def adam(parameters, lr: float, kind: str) -> torch.optim.Optimizer:
    return torch.optim.Adam(list(parameters), lr=lr, fused=kind == "fused" or None)


def convlens_step(sae: torch.nn.Module, x: torch.Tensor, lr: float, kind: str) -> Callable[[], None]:
    sae.train()
    optimizer = adam(sae.parameters(), lr, kind)

    def step() -> None:
        loss = sae(x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sae.after_step()

    return step


def trainer_step(sae: torch.nn.Module, x: torch.Tensor, lr: float, kind: str) -> Callable[[], None] | None:
    """A step through convlens's SAE trainer (its per-step bookkeeping included), where it exists."""
    try:
        from convlens.sae.training import training_step
    except ImportError:
        return None
    optimizer = adam(sae.parameters(), lr, kind)
    return lambda: training_step(sae, optimizer, x, len(x))


def overcomplete_step(
    sae: torch.nn.Module, x: torch.Tensor, lr: float, kind: str, clip: float | None
) -> Callable[[], None]:
    sae.train()
    optimizer = adam(sae.parameters(), lr, kind)

    def step() -> None:
        optimizer.zero_grad()
        _, _, x_hat = sae(x)
        loss = (x - x_hat).square().mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
        optimizer.step()

    return step


def floor_step(x: torch.Tensor, latents: int, lr: float, kind: str | None, relu: bool) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(1)
    scale = x.shape[1] ** 0.5
    encoder = torch.nn.Parameter((torch.randn(latents, x.shape[1], generator=generator) / scale).to(x.device))
    decoder = torch.nn.Parameter((torch.randn(latents, x.shape[1], generator=generator) / scale).to(x.device))
    optimizer = adam([encoder, decoder], lr, kind) if kind else None

    def step() -> None:
        pre = x @ encoder.T
        loss = ((torch.relu(pre) if relu else pre) @ decoder - x).pow(2).sum()
        if optimizer is not None:
            optimizer.zero_grad()
        else:
            encoder.grad = decoder.grad = None
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dim", type=int, default=512)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--aux-k", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--adam",
        choices=("fused", "default"),
        default="fused",
        help="Adam for every case: fused (as convlens's trainer) or torch's default implementation",
    )
    parser.add_argument("--device", default="cpu", help="where every case runs, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-overcomplete", action="store_true", help="skip the peer library (target 2)")
    args = parser.parse_args()

    # overcomplete is imported first (it pulls in timm, OpenCV, scikit-image) so every case runs in the same process
    # state, and the thread count is set after it
    peer, peer_version = (None, "--no-overcomplete") if args.no_overcomplete else import_overcomplete()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.input_dim, generator=torch.Generator().manual_seed(0)).to(device)
    lr, kind = args.lr, args.adam

    def create(name: str, **extra) -> torch.nn.Module:
        sae = convlens.registry.create("sae", name, input_dim=args.input_dim, latent_dim=args.latents, **extra)
        return sae.to(device)

    auxk = create("topk", k=args.k, aux_k=args.aux_k)
    with torch.no_grad():  # a quarter of the latents dead; nothing records activity here, so they stay dead
        auxk.samples_since_fired[::4] = auxk.dead_after
    cases: dict[str, Callable[[], None]] = {
        "relu-l1": convlens_step(create("relu-l1"), x, lr, kind),
        "topk": convlens_step(create("topk", k=args.k, aux_k=0), x, lr, kind),
        "topk+auxk": convlens_step(auxk, x, lr, kind),
        "batchtopk": convlens_step(create("batchtopk", k=args.k, aux_k=0), x, lr, kind),
        "matryoshka": convlens_step(create("matryoshka", k=args.k, aux_k=0), x, lr, kind),
        "matryoshka (topk activation)": convlens_step(
            create("matryoshka", k=args.k, aux_k=0, activation="topk"), x, lr, kind
        ),
        "jumprelu": convlens_step(create("jumprelu"), x, lr, kind),
        "floor matmuls+adam": floor_step(x, args.latents, lr, kind, relu=False),
        "floor matmuls": floor_step(x, args.latents, lr, None, relu=False),
        "floor matmuls+relu+adam": floor_step(x, args.latents, lr, kind, relu=True),
    }
    for name, sae in (("relu-l1", create("relu-l1")), ("topk", create("topk", k=args.k, aux_k=0))):
        step = trainer_step(sae, x, lr, kind)
        if step is not None:
            cases[f"{name} (trainer's training_step)"] = step
    if peer is not None:
        for name, clip in (("overcomplete topk", None), ("overcomplete topk+clip", 1.0)):
            cases[name] = overcomplete_step(
                peer(args.input_dim, nb_concepts=args.latents, top_k=args.k).to(device), x, lr, kind, clip
            )

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in cases.values():
        for _ in range(args.warmup):
            step()
    synchronize()
    best = {name: float("inf") for name in cases}
    started_all, busy_before, own_before = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    for _ in range(args.repeats):
        for name, step in cases.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize()
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    busy_after, wall = busy_cpu_seconds(), time.perf_counter() - started_all
    # the share of the machine's CPUs that other processes used while the rounds ran: above a few per cent, the
    # ratios are not to be trusted (with 2 threads on 2 cores, every parallel op then waits on a descheduled thread)
    other_load = (
        None
        if busy_before is None or busy_after is None
        else max(0.0, (busy_after - busy_before) - (own_cpu_seconds() - own_before)) / (wall * os.cpu_count())
    )

    ms = {name: 1000 * seconds for name, seconds in best.items()}
    ratios = {
        "topk_vs_relu_l1": ms["topk"] / ms["relu-l1"],
        "relu_l1_vs_floor": ms["relu-l1"] / ms["floor matmuls+adam"],
        "relu_l1_vs_floor_without_adam": ms["relu-l1"] / ms["floor matmuls"],
        "relu_l1_vs_floor_with_relu": ms["relu-l1"] / ms["floor matmuls+relu+adam"],
        "auxk_vs_topk": ms["topk+auxk"] / ms["topk"],
        **{
            f"{name}_trainer_step_vs_step": ms[f"{name} (trainer's training_step)"] / ms[name]
            for name in ("relu-l1", "topk")
            if f"{name} (trainer's training_step)" in ms
        },
        "jumprelu_vs_relu_l1": ms["jumprelu"] / ms["relu-l1"],
        "batchtopk_vs_topk": ms["batchtopk"] / ms["topk"],
        "matryoshka_vs_topk": ms["matryoshka"] / ms["topk"],
        "matryoshka_topk_activation_vs_topk": ms["matryoshka (topk activation)"] / ms["topk"],
    }
    if peer is not None:  # steps per second of topk over those of overcomplete's TopK SAE
        ratios["topk_vs_overcomplete"] = ms["overcomplete topk"] / ms["topk"]
        ratios["topk_vs_overcomplete_with_clip"] = ms["overcomplete topk+clip"] / ms["topk"]
    print(
        json.dumps(
            {
                "shape": {
                    "input_dim": args.input_dim,
                    "latents": args.latents,
                    "k": args.k,
                    "aux_k": args.aux_k,
                    "batch": args.batch,
                    "dtype": "float32",
                    "device": str(device),
                },
                "threads": args.threads,
                "cpus": os.cpu_count(),
                "adam": args.adam,
                "steps": args.steps,
                "repeats": args.repeats,
                "torch": torch.__version__,
                "overcomplete": peer_version,
                "other_processes_cpu_share": None if other_load is None else round(other_load, 3),
                "cases": {
                    name: {"ms_per_step": round(value, 2), "steps_per_second": round(1000 / value, 2)}
                    for name, value in ms.items()
                },
                "ratios": {name: round(value, 3) for name, value in ratios.items()},
            },
            indent=1,
        )
    )

    peer_text = (
        f"topk {ratios['topk_vs_overcomplete']:.2f}x overcomplete TopK's steps/s (target >= "
        f"{TARGETS['topk_vs_overcomplete']}; {ratios['topk_vs_overcomplete_with_clip']:.2f}x with its "
        "clip_grad)"
        if peer is not None
        else f"topk vs overcomplete not measured ({peer_version})"
    )
    print(
        f"topk step {ratios['topk_vs_relu_l1']:.2f}x relu-l1 (target <= {TARGETS['topk_vs_relu_l1']}); "
        f"{peer_text}; relu-l1 {ratios['relu_l1_vs_floor']:.2f}x the matmuls+Adam floor (target <= "
        f"{TARGETS['relu_l1_vs_floor']}; {ratios['relu_l1_vs_floor_without_adam']:.2f}x matmuls without Adam, "
        f"{ratios['relu_l1_vs_floor_with_relu']:.2f}x matmuls+ReLU+Adam); info: AuxK {ratios['auxk_vs_topk']:.2f}x "
        f"topk, jumprelu {ratios['jumprelu_vs_relu_l1']:.2f}x relu-l1; batchtopk "
        f"{ratios['batchtopk_vs_topk']:.2f}x topk and matryoshka {ratios['matryoshka_vs_topk']:.2f}x topk (targets <= "
        f"{TARGETS['batchtopk_vs_topk']}; matryoshka with the TopK activation "
        f"{ratios['matryoshka_topk_activation_vs_topk']:.2f}x)"
        + "".join(
            f", {name} through the trainer's training_step {ratios[f'{name}_trainer_step_vs_step']:.2f}x"
            for name in ("topk", "relu-l1")
            if f"{name}_trainer_step_vs_step" in ratios
        )
        + ("" if other_load is None else f"; other processes used {100 * other_load:.0f} % of the CPUs meanwhile")
    )
    if other_load is not None and other_load > 0.05:
        print(
            f"warning: other processes used {100 * other_load:.0f} % of the CPUs during the rounds; the ratios may "
            "reflect their load more than the code (run again on a quiet machine)",
            file=sys.stderr,
        )
    missed = (
        ratios["topk_vs_relu_l1"] > TARGETS["topk_vs_relu_l1"]
        or ratios["relu_l1_vs_floor"] > TARGETS["relu_l1_vs_floor"]
        or ratios.get("topk_vs_overcomplete", float("inf")) < TARGETS["topk_vs_overcomplete"]
        or ratios["batchtopk_vs_topk"] > TARGETS["batchtopk_vs_topk"]
        or ratios["matryoshka_vs_topk"] > TARGETS["matryoshka_vs_topk"]
    )
    if missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
