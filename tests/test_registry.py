import pytest

from edgepkd.errors import ConfigError
from edgepkd.registry import Registry


def test_duplicate_name_fails():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)


def test_unknown_name_lists_valid_ones_and_suggests():
    reg = Registry("teacher")
    reg.register("resnet18", 1)
    reg.register("cnn", 2)
    with pytest.raises(ConfigError) as e:
        reg.get("resnet81")
    msg = str(e.value)
    assert "unknown teacher 'resnet81'" in msg and "did you mean 'resnet18'" in msg
    assert "valid: cnn, resnet18" in msg


def test_decorator_uses_function_name_and_pattern():
    reg = Registry("student")

    @reg.register()
    def mamba_tiny():
        return 1

    assert reg.get("mamba_tiny") is mamba_tiny
    assert reg.names("mamba_*") == ["mamba_tiny"] and reg.names("x*") == []
