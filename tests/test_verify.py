"""Export verification's pass rule for fp32 targets: |out - ref| <= max_abs_diff + max_rel_diff * scale per logit,
scale = |ref| (rel_scale: logit) or the largest |ref| of the image's row (rel_scale: row).

The "runtime" here is the same student evaluated in float64 and rounded to float32: its differences from the
float32 PyTorch model are float rounding and nothing else, the situation of an fp32 export of a model with
large logits. A perturbed weight is the real mismatch that must still fail."""

import copy

import pytest
import torch

from edgepkd.compress.targets import ExportTarget, QuantConfig, VerifyConfig
from edgepkd.compress.verify import verify
from edgepkd.config import from_dict
from edgepkd.errors import ConfigError
from edgepkd.models import build_model


class Float64Model:
    runtime, version = "torch-float64", torch.__version__

    def __init__(self, model):
        self.model = copy.deepcopy(model).double().eval()

    def __call__(self, x):                                           # (1, C, H, W) float32 -> (1, K)
        with torch.no_grad():
            return self.model(torch.from_numpy(x).double()).float().numpy()


def target(**verify_keys) -> ExportTarget:
    return ExportTarget("t", "onnx", "fp32", verify=VerifyConfig(**verify_keys))


@pytest.fixture(scope="module")
def scaled_student():
    """A small Mamba student whose logits are scaled x1000 (head weight and bias), and test images."""
    torch.manual_seed(0)
    model = build_model("mamba", {"d_model": 16, "depth": 1, "d_state": 4, "patch_size": 2}, 10, 1, 8).eval()
    with torch.no_grad():
        model.head.weight.mul_(1000.0)
        model.head.bias.mul_(1000.0)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    return model, x, y


def test_large_logits_pass_with_the_relative_bound_and_a_real_mismatch_still_fails(scaled_student):
    model, x, y = scaled_student
    artifact = Float64Model(model)
    absolute = verify(artifact, model, x, y, target(max_abs_diff=1e-4))
    print("max |diff|", absolute.max_abs_diff, absolute.failures)
    with torch.no_grad():
        assert model(x).abs().max() > 100                            # the logits really are large
    # float rounding alone breaks the absolute bound at this magnitude (the case MNIST's smallest students hit)
    assert not absolute.passed and "|logit diff|" in absolute.failures[0]
    relative = verify(artifact, model, x, y, target(max_abs_diff=1e-4, max_rel_diff=1e-5))
    assert relative.passed, relative.failures

    broken = copy.deepcopy(model)
    with torch.no_grad():                                            # one weight of the mixer, off by 1 %
        broken.blocks[0].mixer.in_proj.weight[0, 0] *= 1.01
    mismatch = verify(Float64Model(broken), model, x, y, target(max_abs_diff=1e-4, max_rel_diff=1e-5))
    print("perturbed: max |diff|", mismatch.max_abs_diff, mismatch.failures)
    assert not mismatch.passed and "·|ref|" in mismatch.failures[0]


def test_the_row_scale_admits_rounding_of_a_small_logit_beside_large_ones_and_a_real_mismatch_still_fails(
        scaled_student):
    model, x, y = scaled_student
    artifact = Float64Model(model)
    with torch.no_grad():
        ref = model(x)
    small = ref.abs() < 1.0                                          # logits near 0 in rows reaching hundreds
    assert small.any() and (ref.abs().amax(1) > 100).all()
    # each logit's own |ref| prices a small logit's rounding far below what it gets from its row's large sums
    per_logit = verify(artifact, model, x, y, target(max_abs_diff=1e-6, max_rel_diff=1e-6))
    print("rel_scale logit:", per_logit.failures)
    assert not per_logit.passed and "·|ref| =" in per_logit.failures[0]
    row = verify(artifact, model, x, y, target(max_abs_diff=1e-6, max_rel_diff=1e-6, rel_scale="row"))
    assert row.passed, row.failures

    broken = copy.deepcopy(model)
    with torch.no_grad():                                            # one weight of the mixer, off by 1 %
        broken.blocks[0].mixer.in_proj.weight[0, 0] *= 1.01
    mismatch = verify(Float64Model(broken), model, x, y,
                      target(max_abs_diff=1e-6, max_rel_diff=1e-6, rel_scale="row"))
    print("rel_scale row, perturbed:", mismatch.failures)
    assert not mismatch.passed
    assert "(row max |ref| " in mismatch.failures[0] and "·max|ref row| =" in mismatch.failures[0]


def test_the_built_in_fp32_targets_scale_by_the_row():
    from edgepkd.compress.targets import load_targets

    fp32 = [t for _, t in load_targets([]).items() if t.precision == "fp32"]
    assert {t.name for t in fp32} >= {"onnx-fp32", "tflite-fp32", "executorch-fp32"}
    assert all(t.verify.rel_scale == "row" and t.verify.max_rel_diff == 5e-5 for t in fp32), \
        [(t.name, t.verify) for t in fp32]


def test_a_nan_logit_fails_whatever_the_bounds(scaled_student):
    model, x, y = scaled_student

    class NaNModel(Float64Model):
        def __call__(self, x):
            out = super().__call__(x)
            out[0, 3] = float("nan")
            return out

    v = verify(NaNModel(model), model, x, y, target(max_abs_diff=1e-4, max_rel_diff=0.5))
    assert not v.passed
    assert not verify(NaNModel(model), model, x, y, target(max_abs_diff=1e-4, max_rel_diff=0.5, rel_scale="row")).passed


def test_verify_config_checks_the_relative_bound_and_rejects_unknown_keys():
    def load(**verify_keys):
        return from_dict(ExportTarget, {"name": "t", "format": "onnx", "precision": "fp32", "verify": verify_keys},
                         source="t.yaml")

    assert load(max_abs_diff=1e-4, max_rel_diff=1e-5).verify.max_rel_diff == 1e-5
    with pytest.raises(ConfigError, match=r"t.yaml: verify.max_rel_diff: must be in \[0, 1\)"):
        load(max_abs_diff=1e-4, max_rel_diff=-1e-5)
    with pytest.raises(ConfigError, match="verify.max_rel: unknown key; did you mean 'max_rel_diff'"):
        load(max_abs_diff=1e-4, max_rel=1e-5)
    assert load(max_abs_diff=1e-4).verify.rel_scale == "logit"
    with pytest.raises(ConfigError, match=r"t.yaml: verify.rel_scale: 'rows' is not allowed; did you mean 'row'"):
        load(max_abs_diff=1e-4, max_rel_diff=1e-5, rel_scale="rows")


class Perturbed(Float64Model):
    """A second opinion that gets one mixer weight 1 % off: a graph a device's other kernels run wrongly."""
    runtime = "perturbed"

    def __init__(self, model, scale=1.01):
        super().__init__(model)
        with torch.no_grad():
            self.model.blocks[0].mixer.in_proj.weight.mul_(scale)


def test_a_second_opinion_that_disagrees_fails_verification_and_one_that_agrees_is_recorded(scaled_student):
    from edgepkd.compress.verify import CROSS_CHECK_IMAGES

    model, x, y = scaled_student
    t = target(max_abs_diff=1e-4, max_rel_diff=1e-5)
    result = verify(Float64Model(model), model, x, y, t, [Float64Model(model)])
    assert result.passed, result.failures
    assert result.cross_checks == [{"runtime": "torch-float64", "images": min(CROSS_CHECK_IMAGES, len(x)),
                                    "max_abs_diff": result.cross_checks[0]["max_abs_diff"], "agreement": 100.0,
                                    "passed": True}]
    assert "cross_checks" in result.as_dict() and "_out" not in result.as_dict()
    bad = verify(Float64Model(model), model, x, y, t, [Perturbed(model)])
    assert not bad.passed and bad.failures[0].startswith("perturbed: |logit diff|"), bad.failures
    assert bad.cross_checks[0]["passed"] is False
    # int8 targets: judged by top-1 agreement with the verified runtime
    t8 = ExportTarget("t8", "onnx", "int8", quantization=QuantConfig(method="ort_dynamic"),
                      verify=VerifyConfig(max_accuracy_drop=100.0))
    assert verify(Float64Model(model), model, x, y, t8, [Perturbed(model, 1.001)]).passed
    wrong = verify(Float64Model(model), model, x, y, t8, [Perturbed(model, -1.0)])
    assert not wrong.passed and "top-1 agreement with torch-float64" in wrong.failures[0], wrong.failures


def test_the_built_in_fp32_rule_passes_float_rounding_and_fails_a_weight_matrix_1_percent_off(scaled_student):
    from edgepkd.compress.targets import load_targets

    model, x, y = scaled_student
    shipped = dict(load_targets([]).items())["tflite-fp32"]
    assert verify(Float64Model(model), model, x, y, shipped).passed
    off = verify(Perturbed(model), model, x, y, shipped)                # in_proj's whole weight x 1.01
    print("shipped rule, in_proj x 1.01:", off.failures)
    assert not off.passed and "·max|ref row|" in off.failures[0]
