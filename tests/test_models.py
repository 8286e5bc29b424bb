import numpy as np
import pytest
import torch

from conftest import registered_student

from edgepkd.compress import onnx_export
from edgepkd.errors import ConfigError
from edgepkd.models import STUDENTS, TEACHERS, MambaStudent, build_teacher, export_mode, set_scan_backend
from edgepkd.models.mamba import EXPORT_FORMS, EXPORTABLE_SCANS, SSMBranch

SHAPES = [(1, 8), (3, 32)]  # (channels, image size): digits-like and CIFAR-like


@pytest.mark.parametrize("name", STUDENTS.names())
@pytest.mark.parametrize("chans, size", SHAPES)
def test_every_registered_student_forward_backward(name, chans, size):
    model = registered_student(name, 10, chans, size, patch_size=4)
    x = torch.randn(2, chans, size, size)
    feats = model.forward_features(x)
    assert feats.shape == (2, (size // 4) ** 2, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0, "no gradient reaches the patch embedding (the first parameter)"


@pytest.mark.parametrize("name", TEACHERS.names())
@pytest.mark.parametrize("chans, size", SHAPES)
def test_every_registered_teacher_forward(name, chans, size):
    model = build_teacher(name, {}, 10, chans, size)
    out = model(torch.randn(2, chans, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0, "no gradient reaches the first layer"


def test_resnet8_is_the_mlperf_tiny_reference_size():
    from edgepkd.models.flops import count_flops

    report = count_flops(build_teacher("resnet8", {}, 10, 3, 32), (3, 32, 32))
    assert 77_000 <= report.params <= 80_000       # MLPerf Tiny: ~78k parameters
    assert 12.0e6 <= report.macs <= 13.0e6          # MLPerf Tiny: ~12.5M MACs


def test_student_is_causal_per_direction_and_bidirectional_sees_the_future():
    torch.manual_seed(0)
    for bidir, expect_change in ((False, False), (True, True)):
        model = MambaStudent(4, 1, 8, d_model=8, depth=1, d_state=2, patch_size=2, bidirectional=bidir).eval()
        tokens = torch.randn(1, 16, 8)
        mixer = model.blocks[0].mixer
        base = mixer(tokens)
        changed = tokens.clone()
        changed[:, -1] += 1.0   # perturb the last position only
        delta = (mixer(changed) - base)[:, :-1].abs().max().item()
        assert (delta > 1e-6) == expect_change, (bidir, delta)


def test_patch_must_divide_image():
    with pytest.raises(ValueError, match="does not divide"):
        MambaStudent(10, 1, 8, d_model=8, patch_size=3)


def test_teacher_args_checked():
    with pytest.raises(ConfigError, match="teacher.args.depth: not an argument of teacher 'cnn'"):
        build_teacher("cnn", {"depth": 3}, 10, 1, 8)


def test_export_mode_forces_an_exportable_scan_and_restores():
    model = MambaStudent(10, 1, 8, d_model=8, depth=2)
    set_scan_backend(model, "auto")
    with export_mode(model):
        assert {m.scan_backend for m in model.modules() if isinstance(m, SSMBranch)} == {"unrolled"}
    with export_mode(model, scan="closed"):
        assert {m.scan_backend for m in model.modules() if isinstance(m, SSMBranch)} == {"closed"}
    with pytest.raises(ValueError, match="not exportable"):
        with export_mode(model, scan="cpp"):
            pass
    assert {m.scan_backend for m in model.modules() if isinstance(m, SSMBranch)} == {"auto"}
    with pytest.raises(ConfigError, match="unknown scan backend"):
        set_scan_backend(model, "cuda")


def test_conv_stem_student_counts_its_stem_for_even_and_odd_patches():
    from edgepkd.models.flops import count_flops

    patch = MambaStudent(10, 3, 32, d_model=16, depth=1, d_state=4, patch_size=4)
    conv = MambaStudent(10, 3, 32, d_model=16, depth=1, d_state=4, patch_size=4, stem="conv")
    x = torch.randn(2, 3, 32, 32)
    assert conv.forward_features(x).shape == patch.forward_features(x).shape == (2, 64, 16)
    conv(x).sum().backward()
    assert all(p.grad is not None for p in conv.parameters())
    a, b = count_flops(patch, (3, 32, 32)), count_flops(conv, (3, 32, 32))
    # the conv stem: 3x3 stride-2 conv 3->8 at 16x16, then a 2x2 stride-2 conv 8->16 at 8x8 (+ bias)
    stem_macs = 3 * 9 * 8 * 16 * 16 + 8 * 4 * 16 * 8 * 8
    assert b.macs - a.macs == stem_macs - 3 * 16 * 16 * 64
    assert conv.spec["stem"] == "conv"
    # odd patch: a stride-1 3x3 conv 1->8 at 28x28, then a 7x7 stride-7 conv 8->16 at 4x4 (16 tokens)
    odd = MambaStudent(10, 1, 28, d_model=16, depth=1, d_state=4, patch_size=7, stem="conv")
    assert odd.seq_len == 16 and odd.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 16, 16)
    plain = MambaStudent(10, 1, 28, d_model=16, depth=1, d_state=4, patch_size=7)
    assert count_flops(odd, (1, 28, 28)).macs - count_flops(plain, (1, 28, 28)).macs == \
        1 * 9 * 8 * 28 * 28 + 8 * 49 * 16 * 16 - 1 * 49 * 16 * 16
    with pytest.raises(ValueError, match="stem 'pixel'"):
        MambaStudent(10, 1, 28, d_model=8, patch_size=7, stem="pixel")


@pytest.mark.parametrize("scan", [s for s in EXPORTABLE_SCANS if s != "torch"])
@pytest.mark.parametrize("name", STUDENTS.names())
@pytest.mark.parametrize("image_size,patch", [(14, 2), (10, 2), (9, 3)])  # L = 49, 25, 9: odd lengths
def test_export_forms_match_the_reference_for_every_registered_student(scan, name, image_size, patch):
    torch.manual_seed(0)
    model = registered_student(name, 10, 1, image_size, patch_size=patch).eval()
    x = torch.randn(3, 1, image_size, image_size)
    with torch.no_grad(), export_mode(model, scan="torch"):
        ref = model(x)
    with torch.no_grad(), export_mode(model, scan=scan):
        out = model(x)
    assert model.seq_len % 2 == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_headed_students_export_with_the_ssd_scan_and_match_every_training_backend():
    torch.manual_seed(0)
    model = MambaStudent(10, 1, 8, d_model=16, depth=2, d_state=8, patch_size=2, heads=4).eval()
    assert model.spec["heads"] == 4 and model.blocks[0].mixer.fwd.A_log.shape == (4, 1)
    x = torch.randn(3, 1, 8, 8)
    with export_mode(model):
        assert {m.scan_backend for m in model.modules() if isinstance(m, SSMBranch)} == {"ssd"}
        with torch.no_grad():
            exported = model(x)
    for backend in ("torch", "cpp", "chunked"):
        set_scan_backend(model, backend)
        with torch.no_grad():
            torch.testing.assert_close(model(x), exported, atol=1e-5, rtol=1e-5)
    plain = MambaStudent(10, 1, 8, d_model=16, depth=1)
    assert "heads" not in plain.spec  # Mamba-1 students keep the spec (and checkpoints) they had
    with export_mode(plain):
        assert {m.scan_backend for m in plain.modules() if isinstance(m, SSMBranch)} == {"unrolled"}
    with pytest.raises(ValueError, match="heads 3 does not divide d_inner 32"):
        MambaStudent(10, 1, 8, d_model=16, heads=3)


def test_heads_in_a_recipe_are_checked_with_their_key():
    from edgepkd.recipe import load_recipe

    assert load_recipe(None, ["students.sizes.0.heads=4"]).students.sizes[0].heads == 4
    with pytest.raises(ConfigError, match=r"students\.sizes\.0\.heads.*divide expand x d_model = 64"):
        load_recipe(None, ["students.sizes.0.heads=5"])


def test_ssd_export_is_one_xnnpack_partition_whose_ops_do_not_grow_with_length(tmp_path):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    import sys
    from pathlib import Path

    import litert_torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from device_speed import tflite_partitions

    litert_torch.config.show_progress = False
    counts = {}
    for patch in (2, 1):  # L = 16 and 64 positions
        for heads in (4, None):
            torch.manual_seed(0)
            model = MambaStudent(10, 1, 8, d_model=16, depth=1, d_state=8, patch_size=patch, heads=heads).eval()
            path = tmp_path / f"p{patch}-h{heads}.tflite"
            with export_mode(model), torch.no_grad():
                litert_torch.convert(model, (torch.randn(1, 1, 8, 8),)).export(str(path))
            counts[patch, heads] = tflite_partitions(str(path))
    for patch in (2, 1):
        assert counts[patch, 4]["partitions"] == 1 and not counts[patch, 4]["outside_delegate"], counts[patch, 4]
    assert counts[1, 4]["ops"] == counts[2, 4]["ops"], counts          # ssd: the same graph at L = 16 and 64
    assert counts[1, None]["ops"] >= counts[2, None]["ops"] + 2 * (64 - 16), counts  # the step loop: per position


def test_onnx_export_form_uses_a_2d_conv_matmuls_and_no_transposes_and_restores_the_training_form(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = MambaStudent(10, 1, 8, d_model=16, depth=1, d_state=8, patch_size=2, heads=4).eval()
    branch = model.blocks[0].mixer.fwd
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    graphs = {}
    for fmt in ("onnx", "tflite"):
        with export_mode(model, fmt=fmt), torch.no_grad():
            assert (branch.scan_backend, branch.conv_form) == (
                ("ssd_onnx", "conv2d") if fmt == "onnx" else ("ssd", "conv1d"))
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
            if fmt == "onnx":
                path = tmp_path / "m.onnx"
                torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, verbose=False,
                                  custom_translation_table=onnx_export._translations())
                graphs[fmt] = onnx.load(str(path)).graph
    assert (branch.scan_backend, branch.conv_form) == ("auto", "conv1d")   # training form restored
    convs = [n for n in graphs["onnx"].node if n.op_type == "Conv"]
    kernel_ranks = {len(next(a.ints for a in n.attribute if a.name == "kernel_shape")) for n in convs}
    assert kernel_ranks == {2}, kernel_ranks                       # patch embed and the (1, K) depthwise conv
    matmul_of_activations = [n for n in graphs["onnx"].node if n.op_type == "MatMul"
                             and not any(i in {t.name for t in graphs["onnx"].initializer} for i in n.input)]
    assert len(matmul_of_activations) >= 2                        # C^T B and (G * M) @ (dt u)
    ops = [n.op_type for n in graphs["onnx"].node]
    assert ops.count("Softplus") == 1 and "Log" not in ops, ops   # dt's softplus as one node
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert ops.count("Transpose") == 1, ops                       # the patch tokens'; the block's fold into MatMuls
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", STUDENTS.names())
@pytest.mark.parametrize("image_size,patch", [(14, 2), (9, 3)])  # L = 49, 9
def test_every_format_form_matches_the_reference_for_every_registered_student(name, image_size, patch):
    """EXPORT_FORMS' other forms (ONNX's conv, ExecuTorch's slices and 4-D means) with each format's scan."""
    torch.manual_seed(0)
    model = registered_student(name, 10, 1, image_size, patch_size=patch).eval()
    x = torch.randn(3, 1, image_size, image_size)
    with torch.no_grad(), export_mode(model, scan="torch"):
        ref = model(x)
    for fmt in EXPORT_FORMS:
        with torch.no_grad(), export_mode(model, fmt=fmt):
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5, msg=fmt)
    assert all(m.form == {} for m in model.modules() if isinstance(getattr(m, "form", None), dict))  # restored


def test_executorch_export_form_is_one_xnnpack_partition_and_restores_the_training_form():
    """MNIST's largest student shape (two headed blocks, conv stem, 16 tokens): the default form lowers to many
    XNNPACK partitions with ops between them (expand_copy, split_with_sizes_copy, unsqueeze_copy, layer_norm, a
    3-D mean), ExecuTorch's form to one partition and nothing else."""
    pytest.importorskip("executorch")
    import warnings

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    model = MambaStudent(10, 1, 28, d_model=16, depth=2, d_state=8, patch_size=7, stem="conv", heads=4).eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)

    def lowered(fmt):
        with export_mode(model, fmt=fmt), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
            edge = to_edge_transform_and_lower(torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()])
        return [str(n.target) for n in edge.exported_program().graph.nodes
                if n.op == "call_function" and "getitem" not in str(n.target)]

    default, et = lowered("tflite"), lowered("executorch")
    assert default.count("executorch_call_delegate") > 1 and len(default) > default.count("executorch_call_delegate")
    assert et == ["executorch_call_delegate"], et
    branch = model.blocks[0].mixer.fwd
    assert (branch.scan_backend, branch.form, model.form) == ("auto", {}, {})  # training form restored


def test_headed_tflite_export_is_right_with_the_builtin_kernels_too(tmp_path):
    """Without XNNPACK (a GPU delegate's fallback, a build without it), TFLite's builtin kernels run some ops in
    place; a MUL on a RESHAPE of the conv output once overwrote it (logits off by up to 10 on digits' chain/s4)."""
    pytest.importorskip("litert_torch")
    interp = pytest.importorskip("ai_edge_litert.interpreter")
    import litert_torch

    litert_torch.config.show_progress = False
    torch.manual_seed(0)
    model = MambaStudent(10, 1, 8, d_model=8, depth=2, d_state=4, patch_size=2, heads=4).eval()
    x = torch.randn(1, 1, 8, 8)
    path = tmp_path / "m.tflite"
    with export_mode(model, fmt="tflite"), torch.no_grad():
        ref = model(x).numpy()
        litert_torch.convert(model, (x,)).export(str(path))
    for resolver in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "BUILTIN_REF"):
        it = interp.Interpreter(model_path=str(path), num_threads=1,
                                experimental_op_resolver_type=getattr(interp.OpResolverType, resolver))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x.numpy())
        it.invoke()
        np.testing.assert_allclose(it.get_tensor(it.get_output_details()[0]["index"]), ref, atol=1e-4,
                                   err_msg=resolver)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_onnx_softplus_is_one_overflow_free_node(tmp_path, beta):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Softplus(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.softplus(x, beta=beta)

    x = torch.linspace(-100, 100, 401).reshape(1, 401)
    path = tmp_path / "softplus.onnx"
    torch.onnx.export(Softplus(), (x,), str(path), dynamo=True, opset_version=18, verbose=False,
                      custom_translation_table=onnx_export._translations())
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Softplus" in ops and "Where" not in ops, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, torch.nn.functional.softplus(x, beta=beta).numpy(), atol=1e-6, rtol=1e-6)
