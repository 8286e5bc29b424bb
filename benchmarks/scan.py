"""Selective-scan backends side by side: forward+backward time, memory kept for backward, training throughput.

    python benchmarks/scan.py                 # writes benchmarks/results/scan.md and scan.json
    python benchmarks/scan.py --quick         # fewer repetitions, for a smoke run
    python benchmarks/scan.py --device cuda   # on a GPU: benchmarks/results/scan-cuda.md and .json

Every backend is also checked against the reference on the same device and inputs: the max abs difference of
the output and of every input gradient is recorded (the tests do the same on CPU, in tests/test_scan.py).

Every number is measured in this one run, on this machine; ratios are to the step-by-step reference ('torch').
Backends: torch (reference), chunked, cpp (edgepkd's), mambapy's Blelloch parallel scan (`pip install mambapy`,
benchmark only; skipped when absent), mamba_ssm's CUDA kernel (when a GPU and the package are present).
On --device cuda the CPU-only cpp kernel is left out.
Memory is the bytes of distinct tensor storages autograd keeps for backward (saved_tensors_hooks), which is
what a training step holds per scan call; it is exact and does not depend on the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepkd.models.scan import SCAN_BACKENDS, _mamba_ssm_fn  # noqa: E402

CONFIGS = [(L, d, n) for L in (49, 64, 196, 256) for d in (32, 128) for n in (4, 16)]
BATCH = 64


def mambapy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """mambapy's own math (mambapy/mamba.py: selective_scan) around its pscan, adapted to edgepkd's signature."""
    from mambapy.pscan import pscan

    delta = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    delta = F.softplus(delta) if delta_softplus else delta
    x, dt = u.float().transpose(1, 2), delta.transpose(1, 2)            # (B, L, D)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)                              # (B, L, D, N)
    BX = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)  # (B, L, D, N)
    hs = pscan(deltaA, BX)                                                # (B, L, D, N)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)                 # (B, L, D)
    y = (y + D * x).transpose(1, 2)                                       # (B, D, L)
    return y * F.silu(z) if z is not None else y


def available_backends(device: str) -> list[str]:
    names = ["torch", "chunked"] + (["cpp"] if device == "cpu" else [])
    try:
        import mambapy.pscan  # noqa: F401

        if "mambapy" not in SCAN_BACKENDS:
            SCAN_BACKENDS.register("mambapy", mambapy_scan)
        names.append("mambapy")
    except ImportError:
        print("mambapy not installed: pip install mambapy to compare with it", file=sys.stderr)
    if device == "cuda" and _mamba_ssm_fn() is not None:
        names.append("mamba_ssm")
    return names


def inputs(L, d, n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = dict(u=r(BATCH, d, L), delta=r(BATCH, d, L) * 0.5, A=-torch.rand(d, n, generator=g) * 2,
             B=r(BATCH, n, L), C=r(BATCH, n, L), D=r(d), z=r(BATCH, d, L), delta_bias=r(d) * 0.1)
    return {k: v.to(device).requires_grad_(True) for k, v in x.items()}


def step(fn, x):
    out = fn(**x, delta_softplus=True)
    out.backward(torch.ones_like(out))
    return out


def reference(L, d, n, device):
    """The reference's output and gradients at one shape, computed once for every backend compared with it."""
    x = inputs(L, d, n, device)
    out = step(SCAN_BACKENDS.get("torch"), x)
    return out.detach(), {k: v.grad for k, v in x.items()}


def max_diffs(name, L, d, n, device, ref) -> dict:
    """Max abs difference to the reference's ``(out, grads)`` on the same device and inputs: output and each
    gradient."""
    ref, ref_g = ref
    x = inputs(L, d, n, device)
    got, got_g = step(SCAN_BACKENDS.get(name), x).detach(), {k: v.grad for k, v in x.items()}
    return {"out": (ref - got).abs().max().item(),
            "grad": max((ref_g[k] - got_g[k]).abs().max().item() for k in ref_g),
            # relative to the largest reference value of the same tensor: grad A reaches 1e4-1e5 at L=256
            "grad_rel": max(((ref_g[k] - got_g[k]).abs().max() / ref_g[k].abs().max().clamp_min(1e-30)).item()
                            for k in ref_g)}


def time_backend(name, L, d, n, min_reps, min_seconds, device):
    fn, x = SCAN_BACKENDS.get(name), inputs(L, d, n, device)
    step(fn, x)  # warm-up (and, for cpp, the kernel build)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        step(fn, x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_bytes(name, L, d, n, device) -> int:
    """Bytes of distinct storages saved for backward by one forward (plus its output)."""
    fn, x = SCAN_BACKENDS.get(name), inputs(L, d, n, device)
    leaves = {t.untyped_storage().data_ptr() for t in x.values()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in leaves:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(**x, delta_softplus=True)
    storages[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(storages.values())


def training_throughput(names, seconds: float, device: str) -> dict:
    """Images/s of a full training step (forward, backward, AdamW) of the MNIST recipe's largest student."""
    from edgepkd.distill.pipeline import plan_students
    from edgepkd.models import STUDENT_ARCH, build_model, set_scan_backend
    from edgepkd.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mnist.yaml")
    spec, flops = plan_students(recipe, (1, 28, 28), 10)[0]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    x, y = x.to(device), y.to(device)
    result = {"student": spec, "mflops": flops.flops / 1e6, "batch": 128, "images_per_s": {}}
    for name in names:
        torch.manual_seed(0)
        model = build_model(STUDENT_ARCH, spec, 10, 1, 28).to(device)
        set_scan_backend(model, name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def train_step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_step()
        steps, start = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - start < seconds:
            train_step()
            steps += 1
            if device == "cuda":
                torch.cuda.synchronize()
        result["images_per_s"][name] = steps * 128 / (time.perf_counter() - start)
        print(f"  training {name:8s} {result['images_per_s'][name]:8.0f} images/s", file=sys.stderr)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition per configuration, short training timing")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the scans run (cuda: results go to scan-cuda.md/.json)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("scan.py: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    names = available_backends(args.device)
    min_reps, min_s = (1, 0.0) if args.quick else (3, 1.0)
    rows = []
    for L, d, n in CONFIGS:
        row = {"L": L, "d_inner": d, "d_state": n, "batch": BATCH, "seconds": {}, "saved_mb": {}, "max_diff": {}}
        expected = reference(L, d, n, args.device)                          # once per shape, for every backend
        for name in names:
            row["seconds"][name] = time_backend(name, L, d, n, min_reps if name != "torch" else 1, min_s,
                                                args.device)
            row["saved_mb"][name] = saved_bytes(name, L, d, n, args.device) / 2 ** 20
            if name != "torch":
                row["max_diff"][name] = max_diffs(name, L, d, n, args.device, expected)
        del expected
        ref = row["seconds"]["torch"]
        print(f"L={L:3d} d={d:3d} N={n:2d}  " + "  ".join(
            f"{k} {v * 1e3:8.1f} ms (x{ref / v:5.1f})" for k, v in row["seconds"].items()), file=sys.stderr)
        rows.append(row)
    train = training_throughput(names, 3.0 if args.quick else 20.0, args.device)
    env = {"machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "device": args.device, "backends": names, "scan": rows, "training": train,
            "command": "python benchmarks/scan.py" + (" --quick" if args.quick else "")
            + (" --device cuda" if args.device == "cuda" else "")}
    stem = "scan" if args.device == "cpu" else "scan-cuda"
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(data))
    print(render(data))
    return 0


def render(data: dict) -> str:
    names = data["backends"]
    env = data["environment"]
    lines = ["# Selective scan backends", "",
             f"`{data['command']}` on {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch threads), "
             f"torch {env['torch']}{', GPU ' + env['cuda'] if env['cuda'] else ''}. Batch {BATCH}; forward + backward, "
             "median; speed-up is the reference's time divided by the backend's; memory is what autograd keeps "
             "for backward.", "",
             "| L | d_inner | d_state | " + " | ".join(f"{n} ms (x)" for n in names) + " | "
             + " | ".join(f"{n} MB" for n in names) + " |",
             "|" + "---:|" * (3 + 2 * len(names))]
    for r in data["scan"]:
        ref = r["seconds"]["torch"]
        lines.append(f"| {r['L']} | {r['d_inner']} | {r['d_state']} | "
                     + " | ".join(f"{r['seconds'][n] * 1e3:.1f} ({ref / r['seconds'][n]:.1f}x)" for n in names)
                     + " | " + " | ".join(f"{r['saved_mb'][n]:.1f}" for n in names) + " |")
    others = [n for n in names if n != "torch"]
    if all("max_diff" in r for r in data["scan"]):
        rel = all("grad_rel" in d for r in data["scan"] for d in r["max_diff"].values())
        lines += ["", f"Parity with the reference on the same device ({data.get('device', 'cpu')}): max abs difference "
                  "of the output / of any input gradient" + (" / of any gradient relative to that gradient's "
                                                              "largest reference value" if rel else "")
                  + ", float32. Random inputs: the gradient of A reaches 1e4-1e5 at L=256, so absolute gradient "
                  "differences grow with L.", "",
                  "| L | d_inner | d_state | " + " | ".join(f"{n} out / grad" + (" / rel" if rel else "")
                                                           for n in others) + " |",
                  "|" + "---:|" * (3 + len(others))]
        for r in data["scan"]:
            lines.append(f"| {r['L']} | {r['d_inner']} | {r['d_state']} | " + " | ".join(
                f"{r['max_diff'][n]['out']:.1e} / {r['max_diff'][n]['grad']:.1e}"
                + (f" / {r['max_diff'][n]['grad_rel']:.1e}" if rel else "") for n in others) + " |")
    t = data["training"]
    s = t["student"]
    ref = t["images_per_s"]["torch"]
    lines += ["", f"Training throughput, MNIST recipe's largest student (d_model {s['d_model']}, depth {s['depth']}, "
              f"d_state {s['d_state']}, patch {s['patch_size']}: {t['mflops']:.2f} MFLOPs), batch {t['batch']}, "
              "forward + backward + AdamW:", "",
              "| backend | images/s | x reference |", "|---|---:|---:|"]
    for name, ips in t["images_per_s"].items():
        lines.append(f"| {name} | {ips:.0f} | {ips / ref:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
