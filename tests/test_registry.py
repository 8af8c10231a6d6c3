import pytest

from vaelab.errors import ConfigError, VaelabError
from vaelab.registry import Registry


def test_unknown_name_lists_valid_ones():
    reg = Registry("widget")
    reg.register("b")(1)
    reg.register("a")(2)
    assert reg["a"] == 2 and list(reg) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"unknown widget 'c': choose one of a, b"):
        reg["c"]
    assert issubclass(ConfigError, VaelabError) and issubclass(ConfigError, ValueError)


def test_duplicate_registration_is_refused():
    reg = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)
