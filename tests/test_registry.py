import pytest

import vlclassify
from vlclassify.errors import ConfigError


def test_registries_list_the_builtins():
    assert {"effnet-minilm", "hf-clip", "open-clip", "toy"} <= set(vlclassify.list_backbones())
    assert {"zero-shot", "linear-probe"} <= set(vlclassify.list_methods())


def test_unknown_names_are_named_in_the_error(toy):
    with pytest.raises(ConfigError, match="nope"):
        vlclassify.create_backbone("nope")
    with pytest.raises(ConfigError, match="nope"):
        vlclassify.create_method("nope", toy)
    with pytest.raises(ConfigError, match="bogus"):
        vlclassify.create_method("linear-probe", toy, bogus=1)


def test_core_does_not_import_heavy_optional_packages():
    import subprocess
    import sys

    code = (
        "import sys, vlclassify, vlclassify.cli; "
        "bad=[m for m in ('torchvision','timm','open_clip') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
