import math

import pytest
import torch

from edgepkd.errors import ConfigError
from edgepkd.models.scan import SCAN_BACKENDS, _mamba_ssm_fn, resolve_backend, selective_scan_torch


def scan_inputs(batch=2, dim=3, length=7, n=4, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length) * 0.5, A=-torch.rand(dim, n, generator=g) * 2,
                B=r(batch, n, length), C=r(batch, n, length), D=r(dim), z=r(batch, dim, length),
                delta_bias=r(dim) * 0.1)


def naive_recurrence(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Scalar, step-by-step, in float64 Python: an independent statement of the S6 recurrence."""
    bsz, dim, length = u.shape
    n = A.shape[1]
    out = torch.zeros(bsz, dim, length, dtype=torch.float64)
    last = torch.zeros(bsz, dim, n, dtype=torch.float64)
    for b in range(bsz):
        for d in range(dim):
            h = [0.0] * n
            for t in range(length):
                dt = float(delta[b, d, t]) + float(delta_bias[d])
                if delta_softplus:
                    dt = math.log1p(math.exp(dt))
                y = 0.0
                for k in range(n):
                    h[k] = math.exp(dt * float(A[d, k])) * h[k] + dt * float(B[b, k, t]) * float(u[b, d, t])
                    y += h[k] * float(C[b, k, t])
                y += float(D[d]) * float(u[b, d, t])
                zz = float(z[b, d, t])
                out[b, d, t] = y * zz / (1.0 + math.exp(-zz))
            last[b, d] = torch.tensor(h, dtype=torch.float64)
    return out, last


@pytest.mark.parametrize("length", [1, 5, 7, 16])
@pytest.mark.parametrize("softplus", [True, False])
def test_reference_matches_naive_recurrence(length, softplus):
    x = scan_inputs(length=length)
    if not softplus:
        x["delta"] = x["delta"].abs() + 0.05
    out, last = selective_scan_torch(**x, delta_softplus=softplus, return_last_state=True)
    ref_out, ref_last = naive_recurrence(**x, delta_softplus=softplus)
    print("max diff", (out.double() - ref_out).abs().max().item())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.double(), ref_last, atol=1e-5, rtol=1e-5)


def test_reference_optional_arguments_and_dtype():
    x = scan_inputs()
    plain = selective_scan_torch(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert plain.shape == x["u"].shape
    half = selective_scan_torch(**{k: v.to(torch.bfloat16) for k, v in x.items()}, delta_softplus=True)
    assert half.dtype == torch.bfloat16  # computes in fp32, casts back (as mamba's selective_scan_ref)


def run_with_grads(name, x, grad_out, **kw):
    inp = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    out = SCAN_BACKENDS.get(name)(**inp, delta_softplus=True, **kw)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in inp.items()}


# every registered backend but the reference itself and the CUDA kernel (tested on a GPU below)
FAST_BACKENDS = [n for n in SCAN_BACKENDS.names() if n not in ("torch", "mamba_ssm")]


def test_the_fast_backends_include_every_exportable_form():
    from edgepkd.models.mamba import EXPORTABLE_SCANS

    assert {"chunked", "cpp"} <= set(FAST_BACKENDS)
    assert set(EXPORTABLE_SCANS) - {"torch", "auto"} <= set(FAST_BACKENDS)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 7, 16, 49, 50, 64, 97])
def test_fast_backends_match_reference_forward_and_gradients(backend, length):
    x = scan_inputs(batch=3, dim=6, length=length, n=5, seed=length)
    grad_out = torch.randn(3, 6, length, generator=torch.Generator().manual_seed(1))
    ref, ref_g = run_with_grads("torch", x, grad_out)
    out, g = run_with_grads(backend, x, grad_out)
    print(backend, length, "max forward diff", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for k in ref_g:
        scale = ref_g[k].abs().max().clamp_min(1.0)  # gradients sum over L: compare relative to their size
        print(k, "max grad diff / scale", ((g[k] - ref_g[k]).abs().max() / scale).item())
        torch.testing.assert_close(g[k] / scale, ref_g[k] / scale, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 13, 40])
def test_chunked_any_chunk_size_and_last_state(chunk):
    from edgepkd.models.scan import selective_scan_chunked

    x = scan_inputs(length=37, n=4)
    ref, ref_last = selective_scan_torch(**x, delta_softplus=True, return_last_state=True)
    out, last = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, chunk=chunk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=1e-5)


def test_chunked_survives_strong_decay_without_nan():
    x = scan_inputs(length=64)
    x["A"] = x["A"] * 200.0  # exp(cumsum) underflows to 0 within a chunk: must stay finite and correct
    ref = selective_scan_torch(**x, delta_softplus=True)
    for name in FAST_BACKENDS:
        out = SCAN_BACKENDS.get(name)(**x, delta_softplus=True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 49])
def test_unrolled_last_state_and_large_step_sizes(length):
    from edgepkd.models.scan import selective_scan_unrolled

    x = scan_inputs(length=length, n=4)
    x["delta"] = x["delta"] * 30.0  # softplus far past F.softplus's threshold (20) on both sides
    ref, ref_last = selective_scan_torch(**x, delta_softplus=True, return_last_state=True)
    out, last = selective_scan_unrolled(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=1e-5)


def test_exportable_softplus_matches_torch_everywhere():
    from edgepkd.models.scan import softplus_exportable

    x = torch.linspace(-100, 100, 20001)
    torch.testing.assert_close(softplus_exportable(x), torch.nn.functional.softplus(x), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(softplus_exportable(torch.tensor([-1e30, 1e30]))).all()


def test_backend_resolution_on_cpu_and_unknown_name():
    assert resolve_backend("auto", "cpu") == "cpp"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="unknown scan backend 'trch'; did you mean 'torch'"):
        resolve_backend("trch", "cpu")


def test_mamba_ssm_backend_without_kernel_says_how_to_install():
    if _mamba_ssm_fn() is not None:
        pytest.skip("mamba-ssm kernel is installed here")
    x = scan_inputs()
    with pytest.raises(ConfigError, match=r"pip install 'edgepkd\[cuda\]'"):
        SCAN_BACKENDS.get("mamba_ssm")(**x, delta_softplus=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("length", [49, 64, 196])
def test_mamba_ssm_kernel_matches_reference_forward_and_gradients(length):
    if _mamba_ssm_fn() is None:
        pytest.skip("mamba-ssm is not installed with its CUDA kernel (pip install 'edgepkd[cuda]')")
    x = scan_inputs(batch=4, dim=32, length=length, n=8)
    results = []
    for name in ("torch", "mamba_ssm"):
        inp = {k: v.cuda().requires_grad_(True) for k, v in x.items()}
        out = SCAN_BACKENDS.get(name)(**inp, delta_softplus=True)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), {k: v.grad for k, v in inp.items()}))
    (ref, ref_g), (fast, fast_g) = results
    print("max forward diff", (ref - fast).abs().max().item())
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-3)
    for k in ref_g:
        print(k, "max grad diff", (ref_g[k] - fast_g[k]).abs().max().item())
        torch.testing.assert_close(fast_g[k], ref_g[k], atol=1e-3, rtol=1e-2)


def test_cpp_falls_back_to_chunked_when_the_kernel_cannot_build(monkeypatch):
    import edgepkd.models.scan as scan

    x = scan_inputs(length=9)
    monkeypatch.setattr(scan, "_cpu_kernel", lambda: None)
    torch.testing.assert_close(scan.selective_scan_cpp(**x, delta_softplus=True),
                               scan.selective_scan_chunked(**x, delta_softplus=True))


def headed_inputs(heads, batch=2, dim=6, length=16, n=5, seed=0):
    """Mamba-2's scalar SSM: ``heads`` step sizes and one decay per head (A: (H, 1))."""
    x = scan_inputs(batch=batch, dim=dim, length=length, n=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x["delta"] = torch.randn(batch, heads, length, generator=g) * 0.5
    x["delta_bias"] = torch.randn(heads, generator=g) * 0.1
    x["A"] = -torch.rand(heads, 1, generator=g) * 2
    return x


def expanded(x, dim=6):
    """The same scan written per channel (Mamba-1's shapes): heads repeated, the decay repeated over N."""
    p = dim // x["delta"].shape[1]
    n = x["B"].shape[1]
    return {**x, "delta": x["delta"].repeat_interleave(p, 1), "delta_bias": x["delta_bias"].repeat_interleave(p),
            "A": x["A"].repeat_interleave(p, 0).expand(-1, n).contiguous()}


@pytest.mark.parametrize("heads", [6, 3, 1])
@pytest.mark.parametrize("length", [1, 7, 16])
def test_every_backend_takes_heads_as_the_same_scan_per_channel(heads, length):
    x = headed_inputs(heads, length=length, seed=length)
    grad_out = torch.randn(2, 6, length, generator=torch.Generator().manual_seed(2))
    ref, ref_g = run_with_grads("torch", expanded(x), grad_out)
    for backend in FAST_BACKENDS:
        out, g = run_with_grads(backend, x, grad_out)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for k in ("u", "B", "C", "D", "z"):  # per-channel gradients; heads' are sums of them, checked below
            scale = ref_g[k].abs().max().clamp_min(1.0)
            torch.testing.assert_close(g[k] / scale, ref_g[k] / scale, atol=1e-5, rtol=1e-5)
        p = 6 // heads
        for k, dim in (("delta", 1), ("delta_bias", 0), ("A", 0)):
            want = ref_g[k].unflatten(dim, (heads, p)).sum(dim + 1)
            if k == "A":
                want = want.sum(-1, keepdim=True)
            scale = want.abs().max().clamp_min(1.0)
            torch.testing.assert_close(g[k] / scale, want / scale, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["ssd", "ssd_onnx"])
@pytest.mark.parametrize("length", [1, 2, 16, 49])
def test_ssd_last_state_and_strong_decay(length, backend):
    x = headed_inputs(3, length=length)
    x["A"] = x["A"] * 200.0   # exp(S_t - S_s) underflows to 0 off the diagonal: stays finite and right
    x["delta"] = x["delta"] * 30.0
    ref, ref_last = selective_scan_torch(**expanded(x), delta_softplus=True, return_last_state=True)
    out = SCAN_BACKENDS.get(backend)(**x, delta_softplus=True)
    _, last = SCAN_BACKENDS.get(backend)(**x, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(out).all()
    # step sizes up to ~40 make outputs of ~30: float32 sums in another order differ by ~4e-5 relative
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, ref_last, atol=1e-4, rtol=1e-4)


def test_heads_that_do_not_divide_the_channels_fail():
    x = headed_inputs(4)  # 4 heads, 6 channels
    for backend in ("torch", "ssd"):
        with pytest.raises(ValueError, match="4 heads, which do not divide the 6 channels"):
            SCAN_BACKENDS.get(backend)(**x, delta_softplus=True)
