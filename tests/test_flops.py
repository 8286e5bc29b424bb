import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import registered_student
from edgepkd.models import STUDENTS, TEACHERS, MambaStudent, build_teacher
from edgepkd.models.flops import count_flops


def test_hand_computed_small_student():
    # 4x4 gray image, patch 2 -> L = 4 tokens; d_model 4, d_inner 8, d_state 2, dt_rank 1, d_conv 4, 3 classes.
    model = MambaStudent(3, 1, 4, d_model=4, depth=1, d_state=2, expand=2, d_conv=4, patch_size=2)
    r = count_flops(model, (1, 4, 4))
    per_layer = {layer.name: layer.macs for layer in r.layers}
    expected = {
        "patch_embed": 16 * 4,                    # 4 channels x 2x2 outputs, each 1x2x2 MACs
        "blocks.0.mixer.in_proj": 4 * 16 * 4,     # L x 2·d_inner x d_model
        "blocks.0.mixer.fwd.conv1d": 8 * 4 * 4,   # d_inner x L x d_conv (depthwise, causal)
        "blocks.0.mixer.fwd.x_proj": 4 * 5 * 8,   # L x (dt_rank + 2N) x d_inner
        "blocks.0.mixer.fwd.dt_proj": 4 * 8 * 1,  # L x d_inner x dt_rank
        "blocks.0.mixer.out_proj": 4 * 4 * 8,     # L x d_model x d_inner
        "head": 3 * 4,
    }
    for name, macs in expected.items():
        assert per_layer[name] == macs, name
    assert r.macs == 780
    scan = 9 * 4 * 8 * 2 + 2 * 4 * 8              # 9·L·D·N + D skip + z gate
    assert [layer.flops for layer in r.layers if layer.kind == "selective_scan"] == [scan]
    assert r.flops == 2 * 780 + scan == 2200
    assert r.params == 283
    assert r.bytes() == {"fp32": 4 * 283, "fp16": 2 * 283, "int8": 283}


def torch_counted_flops(model, shape) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", STUDENTS.names())
def test_conv_linear_part_matches_flopcountermode_students(name):
    model = registered_student(name, 10, 1, 16, patch_size=4)
    r = count_flops(model, (1, 16, 16))
    # The reference scan uses only elementwise ops, which FlopCounterMode does not count.
    assert torch_counted_flops(model, (1, 16, 16)) == 2 * r.macs


@pytest.mark.parametrize("name", TEACHERS.names())
def test_conv_linear_part_matches_flopcountermode_teachers(name):
    model = build_teacher(name, {}, 10, 3, 32)
    r = count_flops(model, (3, 32, 32))
    assert torch_counted_flops(model, (3, 32, 32)) == 2 * r.macs == r.flops


def test_bidirectional_doubles_the_branch_costs():
    one = count_flops(MambaStudent(10, 1, 8, d_model=8, d_state=4), (1, 8, 8))
    two = count_flops(MambaStudent(10, 1, 8, d_model=8, d_state=4, bidirectional=True), (1, 8, 8))
    scan_one = sum(layer.flops for layer in one.layers if layer.kind == "selective_scan")
    assert sum(layer.flops for layer in two.layers if layer.kind == "selective_scan") == 2 * scan_one
