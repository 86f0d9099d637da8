"""The guard's overhead on a GPT-2-shaped model: step time without it, with it, and on a trigger.

Variants, each its own copy of the same model (same init, same batches), timed in interleaved
blocks so that a noisy, shared machine slows them alike:
- `plain`: forward, backward, `optimizer.step()` (AdamW), `zero_grad`;
- `guard`: the same with `guard.step(loss)` at the default `GuardConfig()` (monitor every 10
  steps, 8 matrices per check);
- `guard-every`: the monitor checking every step (`check_every=1`);
- `trigger`: every step a trigger (spike factor ~0, no cooldown): smooth all monitored matrices
  in place and skip. The cost of one trigger step.
Reported: the median step time of each and its ratio to `plain` (noisy on a shared machine),
and the guard's own time: `guard.step` minus the inner `optimizer.step` it calls, both timed
inside the same call, as a share of the plain step (the overhead figure to quote), and the
step time that implies: plain + own (a trigger step also saves the skipped optimizer step).
Goals (issue 13): <= 1 % at the default cadence, <= 5 % checking every step, a trigger step
<= 3x a normal step.

Host synchronisations: counted, not timed, by patching `Tensor.item`, `.tolist`, `.cpu`,
`.numpy`, `__bool__`, `__float__`, `__int__` during `guard.step` calls only (forward/backward
and the optimizer are not the guard's). On CUDA each is a device sync; on CPU the count says
what a GPU run would pay.

    python benchmarks/bench_guard.py                      # CPU-sized GPT-2 shape
    python benchmarks/bench_guard.py --device cuda --width 768 --layers 12 --seq 512 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from cpu_info import cpu_name
from transformers import GPT2Config, GPT2LMHeadModel

from pss_cli.guard import Guard, GuardConfig, TriggerAction


@dataclass
class Variant:
    name: str
    model: GPT2LMHeadModel
    optimizer: torch.optim.Optimizer
    guard: Guard | None
    step_times: list[float] = field(default_factory=list)
    guard_times: list[float] = field(default_factory=list)  # guard.step (incl. inner step)
    opt_times: list[float] = field(default_factory=list)  # optimizer.step (plain, or inside guard)
    own_times: list[float] = field(default_factory=list)  # guard.step minus its optimizer.step


def build(args: argparse.Namespace, name: str, config: GuardConfig | None) -> Variant:
    torch.manual_seed(0)
    gpt = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=args.seq,
        bos_token_id=0,
        eos_token_id=0,
        # No dropout: the variants must do the same arithmetic (the guard itself never draws
        # from the global RNG, but the variants run in a different order).
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(gpt).to(args.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    guard = Guard(model, optimizer, config) if config is not None else None
    return Variant(name, model, optimizer, guard)


def batches(args: argparse.Namespace, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
        for _ in range(n)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(v: Variant, tokens: torch.Tensor, device: str) -> None:
    sync(device)
    start = time.perf_counter()
    loss = v.model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    sync(device)
    mid = time.perf_counter()
    inner: list[float] = []
    if v.guard is None:
        v.optimizer.step()
    else:
        v.optimizer.step = timed(v.optimizer.step, inner, device)  # type: ignore[method-assign]
        try:
            v.guard.step(loss)
        finally:
            del v.optimizer.step
    sync(device)
    end = time.perf_counter()
    v.optimizer.zero_grad(set_to_none=True)
    v.step_times.append(end - start)
    if v.guard is None:
        v.opt_times.append(end - mid)
    else:
        v.guard_times.append(end - mid)
        v.opt_times.append(sum(inner))
        # The guard's own work, measured inside the same call: far less noisy on a shared
        # machine than the difference of two step-time medians.
        v.own_times.append(end - mid - sum(inner))


def timed(method: Any, into: list[float], device: str) -> Any:
    def run(*a: Any, **k: Any) -> Any:
        sync(device)
        start = time.perf_counter()
        out = method(*a, **k)
        sync(device)
        into.append(time.perf_counter() - start)
        return out

    return run


_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_syncs() -> Iterator[list[str]]:
    """Patch the Tensor methods that read a value back to the host; yield the calls made."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def wrap(name: str, method: Any) -> Any:
        def counted(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            calls.append(name)
            return method(self, *a, **k)

        return counted

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def syncs_per_step(v: Variant, tokens: list[torch.Tensor]) -> list[int]:
    """Syncs made by the guard itself: the inner optimizer's step is not counted (torch's
    AdamW reads each parameter's step count with `.item()` unless capturable=True)."""
    assert v.guard is not None
    counts = []
    inner_step = v.optimizer.step
    for t in tokens:
        loss = v.model(input_ids=t, labels=t).loss
        loss.backward()
        with count_syncs() as calls:
            mark: list[int] = []

            def step_uncounted(*a: Any, mark: list[int] = mark, **k: Any) -> Any:
                mark.append(len(calls))
                out = inner_step(*a, **k)
                del calls[mark[-1] :]
                return out

            v.optimizer.step = step_uncounted  # type: ignore[method-assign]
            try:
                v.guard.step(loss)
            finally:
                del v.optimizer.step
        v.optimizer.zero_grad(set_to_none=True)
        counts.append(len(calls))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    # CPU default: GPT-2's shape (pre-LN blocks, fused c_attn, 4x MLP, tied LM head) at a width
    # and depth that train at a few steps per second on 2 cores.
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--block", type=int, default=8, help="steps per variant per round")
    args = parser.parse_args()

    # Every step after the first a spike (factor ~0, no cooldown): smooth + skip each time.
    trigger = GuardConfig(
        spike_factor=1e-9, warmup_steps=1, cooldown_steps=0, zscore_action=TriggerAction.OFF
    )
    variants = [
        build(args, "plain", None),
        build(args, "guard", GuardConfig()),
        build(args, "guard-every", GuardConfig(check_every=1)),
        build(args, "trigger", trigger),
    ]
    data = batches(args, args.block)
    for v in variants:  # warm-up: allocator, first power-iteration visits, the trigger's EMA
        for i in range(args.warmup):
            one_step(v, data[i % len(data)], args.device)
        for times in (v.step_times, v.guard_times, v.opt_times, v.own_times):
            times.clear()
    # Interleaved step by step: a burst of load from other processes hits every variant alike.
    for _ in range(args.rounds):
        for t in data:
            for v in variants:
                one_step(v, t, args.device)

    plain = statistics.median(variants[0].step_times)
    n_params = sum(p.numel() for p in variants[0].model.parameters())
    print(
        f"pss guard overhead: GPT-2 shape, {args.layers} layers, width {args.width}, "
        f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}; {n_params / 1e6:.1f}M params; "
        f"{len(variants[1].guard.specs) if variants[1].guard else 0} monitored matrices"
    )  # type: ignore[union-attr]
    print(
        f"device {args.device}; CPU: {cpu_name()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} logical CPUs"
    )
    print(f"{args.rounds} interleaved rounds x {args.block} steps per variant (medians)\n")
    plain_opt = statistics.median(variants[0].opt_times)
    plain_min = min(variants[0].step_times)
    print(
        f"{'variant':<12} {'step ms':>9} {'x plain':>8} {'own ms':>8} {'own/plain':>10} "
        f"{'plain+own x':>12} {'min step ms':>12} {'min own ms':>11} {'min x':>7}"
    )
    for v in variants:
        step = statistics.median(v.step_times)
        low = min(v.step_times)
        if v.guard is None:
            own = share = implied = low_own = low_x = "-"
        else:
            own_s = statistics.median(v.own_times)
            own_low = min(v.own_times)
            skipped_all = v.guard.counters["skipped"] == v.guard.counters["steps"]
            saved_opt = plain_opt if skipped_all else 0.0
            own, share = f"{own_s * 1e3:.2f}", f"{own_s / plain:.2%}"
            implied = f"{(plain + own_s - saved_opt) / plain:.3f}"
            low_own = f"{own_low * 1e3:.2f}"
            low_saved = min(variants[0].opt_times) if skipped_all else 0.0
            low_x = f"{(plain_min + own_low - low_saved) / plain_min:.3f}"
        row = f"{v.name:<12} {step * 1e3:9.1f} {step / plain:8.3f} {own:>8} {share:>10}"
        print(f"{row} {implied:>12} {low * 1e3:12.1f} {low_own:>11} {low_x:>7}")
    print(
        f"plain optimizer.step (AdamW): {plain_opt * 1e3:.2f} ms median. 'plain+own x': the "
        "plain median step plus the guard's own median time (a trigger step also saves the "
        "skipped optimizer step); 'min x': the same from the fastest plain step and the "
        "fastest own time (the least disturbed figures on a shared machine)."
    )
    lo, hi = (min(variants[0].step_times), max(variants[0].step_times))
    print(f"plain step min-max {lo * 1e3:.1f}-{hi * 1e3:.1f} ms (the noise floor of the ratios)")

    print("\nhost syncs inside guard.step (Tensor.item/tolist/cpu/numpy/bool/float/int):")
    for v in variants[1:]:
        counts = syncs_per_step(v, data)
        print(
            f"  {v.name:<12} per step: min {min(counts)}, median {statistics.median(counts):g}, "
            f"max {max(counts)}"
        )
    counters = variants[3].guard.counters if variants[3].guard else {}
    print(
        f"\ntrigger variant: {counters.get('triggers')} triggers, {counters.get('smoothed')} "
        "matrices smoothed in total"
    )


if __name__ == "__main__":
    main()
