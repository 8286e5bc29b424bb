"""Mamba students for image classification, in pure PyTorch.

    image (B, C, H, W) -> patch embedding -> + position -> depth x [x + Mixer(LayerNorm(x))]
          -> LayerNorm -> mean over patches -> Linear head

Mixer (Mamba, Gu & Dao 2023): in_proj -> (x, z); x -> depthwise causal conv1d -> SiLU -> x_proj -> (dt, B, C);
dt -> dt_proj; selective scan(x, dt, A, B, C, D) * SiLU(z) -> out_proj. With ``bidirectional`` (as in
Vision Mamba) a second conv/x_proj/dt_proj/A/D branch scans the reversed sequence and the two outputs add.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepkd.models.scan import get_scan, resolve_backend


class SSMBranch(nn.Module):
    """Conv + selective scan over one direction of the sequence. Its scan FLOPs are reported by ``scan_flops``.

    ``heads`` None: Mamba-1's S6, a step size per channel and N decays per channel (A: (d_inner, N)). ``heads`` H:
    Mamba-2's scalar SSM, the channels in H groups that share one step size and one decay (dt_proj: H outputs,
    A: (H, 1)); its export form, the 'ssd' scan, is a few batched matmuls instead of one step per position."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, heads: int | None = None):
        super().__init__()
        if heads is not None and (heads < 1 or d_inner % heads):
            raise ValueError(f"heads {heads} does not divide d_inner {d_inner} (expand x d_model)")
        self.d_inner, self.d_state, self.dt_rank, self.heads = d_inner, d_state, dt_rank, heads
        n_dt = heads or d_inner
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)  # causal: left padding in forward
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, n_dt, bias=True)
        # Mamba's initialisation: dt = softplus(bias) log-uniform in [dt_min, dt_max], A = -(1..N) per channel;
        # with heads, Mamba-2's: A = -a per head, a uniform in [1, 16].
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(n_dt) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if heads is None:
            A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)  # (D, N)
        else:
            A_log = torch.log(torch.empty(heads, 1).uniform_(1, 16))                                 # (H, 1)
        self.A_log = nn.Parameter(A_log)
        self.D = nn.Parameter(torch.ones(d_inner))
        self.scan_backend = "auto"
        self.conv_form = "conv1d"  # export_mode may set 'conv2d' (the same weights, see ``EXPORT_FORMS``)
        self.form: dict = {}       # export_mode sets its format's EXPORT_FORMS entry ('split', 'norm')

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # x, z: (B, d_inner, L)
        pad = (self.conv1d.kernel_size[0] - 1, 0)
        if self.conv_form == "conv2d":  # pad after the unsqueeze: onnxruntime fuses a Pad right before a Conv
            x = F.pad(x.unsqueeze(2), pad)                                  # (B, d_inner, 1, L + d_conv - 1)
            x = F.conv2d(x, self.conv1d.weight.unsqueeze(2), self.conv1d.bias,
                         groups=self.d_inner).squeeze(2)                    # (B, d_inner, L)
        else:
            x = self.conv1d(F.pad(x, pad))                                  # (B, d_inner, L)
        x = F.silu(x)                                                       # (B, d_inner, L) causal
        if self.form.get("proj") == "channels" and self.heads is not None:  # W @ x on (B, d, L), no transposes,
            r = self.dt_rank  # dt_proj folded into x_proj (the exporter folds the weights' product to one constant)
            w = torch.cat([self.dt_proj.weight @ self.x_proj.weight[:r], self.x_proj.weight[r:]])  # (H + 2N, D)
            dt, B, C = _split(w @ x, [self.heads, self.d_state, self.d_state], self.form,
                              dim=1)                                        # (B, H, L), (B, N, L), (B, N, L)
            dt = dt + self.dt_proj.bias[:, None]                            # (B, H, L)
        elif self.form.get("proj") == "channels":  # Mamba-1: not folded (that would be a (D, D) matrix)
            dt, B, C = _split(self.x_proj.weight @ x, [self.dt_rank, self.d_state, self.d_state], self.form,
                              dim=1)                                        # (B, R, L), (B, N, L), (B, N, L)
            dt = self.dt_proj.weight @ dt + self.dt_proj.bias[:, None]      # (B, D, L)
        else:
            dt, B, C = _split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state],
                              self.form)                                    # (B, L, R), (B, L, N), (B, L, N)
            dt = self.dt_proj(dt).transpose(1, 2)                           # (B, H, L); H = d_inner or heads
            B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (B, N, L) each
        A = -torch.exp(self.A_log.float())                                  # (d_inner, N) or (heads, 1)
        scan = get_scan(resolve_backend(self.scan_backend, x.device))
        return scan(x, dt, A, B, C, self.D.float(), z=z, delta_softplus=True)  # (B, d_inner, L)

    def scan_flops(self, length: int) -> int:
        """Selective-scan FLOPs per sample, of the form a device runs, + L·D for the D skip + L·D for the z gate.
        Mamba-1: 9·L·D·N (VMamba's ``flops_selective_scan_ref`` convention, derived from the Mamba reference).
        Heads (the 'ssd' form): 2·L²·N for G = C^T B; 2·H·L³ for the segment sums (a matmul with an (L, L²)
        constant); 3·H·L² for the mask, exp and the product with G; 2·D·L² for the product with dt·u; L·D for
        dt·u."""
        skip_gate = 2 * length * self.d_inner
        if self.heads is None:
            return 9 * length * self.d_inner * self.d_state + skip_gate
        sq = length * length
        return (2 * sq * self.d_state + 2 * self.heads * sq * length + 3 * self.heads * sq + 2 * self.d_inner * sq
                + length * self.d_inner + skip_gate)


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int, expand: int, d_conv: int, dt_rank: int, bidirectional: bool,
                 heads: int | None = None):
        super().__init__()
        d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.fwd = SSMBranch(d_inner, d_state, d_conv, dt_rank, heads=heads)
        self.bwd = SSMBranch(d_inner, d_state, d_conv, dt_rank, heads=heads) if bidirectional else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.form: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:                     # x: (B, L, d_model)
        if self.form.get("proj") == "channels":
            xz = self.in_proj.weight @ x.transpose(1, 2)                    # (B, 2 d_inner, L): one MatMul
        else:
            xz = self.in_proj(x).transpose(1, 2)                            # (B, 2 d_inner, L)
        if self.form.get("split") == "slice":
            x, z = _split(xz, [self.fwd.d_inner] * 2, self.form, dim=1)     # (B, d_inner, L) each
        else:
            x, z = xz.chunk(2, dim=1)                                       # (B, d_inner, L) each
        y = self.fwd(x, z)                                                  # (B, d_inner, L)
        if self.bwd is not None:
            y = y + self.bwd(x.flip(-1), z.flip(-1)).flip(-1)
        return self.out_proj(y.transpose(1, 2))                             # (B, L, d_model)


class MambaBlock(nn.Module):
    def __init__(self, d_model: int, **mixer):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = MambaMixer(d_model, **mixer)
        self.form: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:                     # x: (B, L, d_model)
        return x + self.mixer(_layer_norm(self.norm, x, self.form))


def _split(x: torch.Tensor, sizes: list[int], form: dict, dim: int = -1) -> list[torch.Tensor]:
    """``x.split(sizes, dim)``, or with ``form['split'] == 'slice'`` one slice per piece (ExecuTorch's XNNPACK
    partitioner takes slice_copy but not split_with_sizes_copy)."""
    if form.get("split") != "slice":
        return list(x.split(sizes, dim=dim))
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return [x.narrow(dim, a, b - a) for a, b in zip(bounds, bounds[1:])]


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor, form: dict) -> torch.Tensor:  # x: (B, L, D)
    """``ln(x)``, or with ``form['norm'] == 'mean4d'`` the same normalisation from means over the last two
    dimensions of a (B, L, D, 1) view, the mean XNNPACK lowers (a global average pool) in ExecuTorch, where
    layer_norm and a mean over one dimension of a 3-D tensor stay outside the delegate."""
    if form.get("norm") != "mean4d":
        return ln(x)
    b, length, d = x.shape
    x4 = x.reshape(b, length, d, 1)                                          # (B, L, D, 1)
    c = x4 - x4.mean((2, 3), keepdim=True)                                  # (B, L, D, 1)
    y = c * torch.rsqrt((c * c).mean((2, 3), keepdim=True) + ln.eps)        # (B, L, D, 1)
    return y.reshape(b, length, d) * ln.weight + ln.bias                    # (B, L, D)


STEMS = ("patch", "conv")


class MambaStudent(nn.Module):
    """A Mamba image classifier; ``spec`` is the architecture dict (a ``StudentSpec`` as plain data)."""

    def __init__(self, num_classes: int, in_chans: int, image_size: int, d_model: int, depth: int = 1,
                 d_state: int = 8, expand: int = 2, d_conv: int = 4, patch_size: int = 2,
                 bidirectional: bool = False, dt_rank: int | None = None, stem: str = "patch",
                 heads: int | None = None):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        if stem not in STEMS:
            raise ValueError(f"stem '{stem}' is not one of {', '.join(STEMS)}")
        self.spec = dict(d_model=d_model, depth=depth, d_state=d_state, expand=expand, d_conv=d_conv,
                         patch_size=patch_size, bidirectional=bidirectional, dt_rank=dt_rank, stem=stem)
        if heads is not None:  # only when set: Mamba-1 students keep the spec (and checkpoints) they had
            self.spec["heads"] = heads
        self.num_classes, self.num_features = num_classes, d_model
        self.seq_len = (image_size // patch_size) ** 2
        dt_rank = dt_rank or math.ceil(d_model / 16)
        if stem == "patch":  # ViT / Vision Mamba: one linear projection per non-overlapping patch
            self.patch_embed = nn.Conv2d(in_chans, d_model, patch_size, stride=patch_size)
        else:                # conv: a 3x3 conv-BN-ReLU (stride 2 for an even patch_size, else 1), then the
            half = max(8, d_model // 2)  # rest of the patch as a patch conv (patch_size/2, or patch_size)
            stride = 2 if patch_size % 2 == 0 else 1
            self.patch_embed = nn.Sequential(
                nn.Conv2d(in_chans, half, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, d_model, patch_size // stride, stride=patch_size // stride))
        self.pos_embed = nn.Parameter(torch.randn(1, self.seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            MambaBlock(d_model, d_state=d_state, expand=expand, d_conv=d_conv, dt_rank=dt_rank,
                       bidirectional=bidirectional, heads=heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.form: dict = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:           # x: (B, C, H, W)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, d_model)
        for block in self.blocks:
            x = block(x)                                                    # (B, L, d_model)
        return _layer_norm(self.norm, x, self.form)                         # (B, L, d_model)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.form.get("norm") == "mean4d":                               # the token mean as a 4-D one
            b, length, d = x.shape
            x = x.transpose(1, 2).reshape(b, d, length, 1).mean((2, 3), keepdim=True).reshape(b, d)  # (B, d_model)
        else:
            x = x.mean(dim=1)                                               # (B, d_model)
        return x if pre_logits else self.head(x)                            # (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def set_scan_backend(model: nn.Module, name: str) -> None:
    """Use scan backend ``name`` ('auto', 'torch', 'mamba_ssm') in every SSM branch of ``model``."""
    resolve_backend(name, "cpu")  # validates the name
    for m in model.modules():
        if isinstance(m, SSMBranch):
            m.scan_backend = name


EXPORTABLE_SCANS = ("auto", "unrolled", "ssd", "ssd_matmul", "ssd_onnx", "ssd_bmm", "torch", "closed")

# What an export format runs differently from the default form (measured in its runtime, issue #13; the same
# math, the same weights). onnxruntime: the depthwise causal conv as a (1, K) Conv2d (its 1-D depthwise Conv took
# 7.6 us for 96 channels x 16 positions, the 2-D one 3.9 us) with the padding where onnxruntime fuses it into the
# Conv; the projections of a branch as W @ x on (B, d, L) ('proj': 'channels'; headed: dt_proj folded into
# x_proj), so that no Transpose is left in a block (onnxruntime folds the one of in_proj's input into its
# MatMul); and the headed scan as 'ssd_onnx' (C^T B as one MatMul, the product computed transposed, softplus as
# one node): the MNIST recipe's largest student goes from 98 to 72 nodes after onnxruntime's optimisation.
# TFLite keeps the defaults: there a matmul of two activations leaves XNNPACK, and the conv is the same
# DEPTHWISE_CONV_2D either way. ExecuTorch (XNNPACK partitioner): the headed scan as 3-D bmm ('ssd_bmm'), the
# splits as slices, LayerNorm and the token mean from 4-D means, so that the whole student is one XNNPACK
# partition (the MNIST recipe's largest: 14 partitions and 27 ops outside them before).
# ONNX quantized by onnxruntime's quantizers ('onnx-ort-quantized', ExportTarget.form) keeps the projections as
# x @ W^T: those quantizers take a MatMul's weight as its second operand (per-channel axis 1, and dynamic
# quantization's MatMulConstBOnly), and exclude_modules matches the projections' own module names.
EXPORT_FORMS: dict[str, dict] = {"onnx": {"conv": "conv2d", "headed_scan": "ssd_onnx", "proj": "channels"},
                                 "executorch": {"headed_scan": "ssd_bmm", "split": "slice", "norm": "mean4d"}}
EXPORT_FORMS["onnx-ort-quantized"] = {k: v for k, v in EXPORT_FORMS["onnx"].items() if k != "proj"}


def export_scan(branch: SSMBranch, scan: str = "auto", fmt: str | None = None) -> str:
    """The scan a branch exports with: 'auto' is 'ssd' for headed branches (one decay per head: batched
    matmuls; ``EXPORT_FORMS`` may name another for ``fmt``), else 'unrolled' (the step loop, laid out for device
    runtimes)."""
    if scan != "auto":
        return scan
    if branch.heads is None:
        return "unrolled"
    return EXPORT_FORMS.get(fmt, {}).get("headed_scan", "ssd")


@contextlib.contextmanager
def export_mode(model: nn.Module, scan: str = "auto", fmt: str | None = None):
    """Use an exportable pure-PyTorch scan in every branch ('auto': each branch's device form for export format
    ``fmt``, see ``export_scan`` and ``EXPORT_FORMS``; or 'unrolled', 'ssd', 'ssd_matmul', 'ssd_onnx', 'ssd_bmm',
    the reference 'torch', 'closed') and ``fmt``'s other forms (conv, split, norm), restoring the training forms
    afterwards."""
    if scan not in EXPORTABLE_SCANS:
        raise ValueError(f"scan '{scan}' is not exportable (exportable: {', '.join(EXPORTABLE_SCANS)})")
    branches = [m for m in model.modules() if isinstance(m, SSMBranch)]
    formed = [m for m in model.modules() if isinstance(m, (SSMBranch, MambaMixer, MambaBlock, MambaStudent))]
    saved = [(m.scan_backend, m.conv_form) for m in branches]
    saved_forms = [m.form for m in formed]
    for m in branches:
        m.scan_backend = export_scan(m, scan, fmt)
        m.conv_form = EXPORT_FORMS.get(fmt, {}).get("conv", "conv1d")
    for m in formed:
        m.form = EXPORT_FORMS.get(fmt, {})
    try:
        yield model
    finally:
        for m, (name, conv) in zip(branches, saved):
            m.scan_backend, m.conv_form = name, conv
        for m, form in zip(formed, saved_forms):
            m.form = form
