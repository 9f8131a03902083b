from __future__ import annotations

import pytest

from omotool.errors import UsageError
from omotool.registry import Registry


def test_register_get_and_list() -> None:
    registry: Registry[int] = Registry("thing")
    registry.register("alpha", help="first")(1)
    registry.register("beta")(2)
    assert registry.get("beta") == 2
    assert registry.names() == ["alpha", "beta"] and list(registry) == ["alpha", "beta"]
    assert "alpha" in registry and len(registry) == 2
    assert registry.help("alpha") == "first"


def test_unknown_name_lists_choices_and_close_match() -> None:
    registry: Registry[int] = Registry("thing")
    registry.register("magnitude")(1)
    with pytest.raises(UsageError, match="Unknown thing 'magnitde'.*Did you mean 'magnitude'"):
        registry.get("magnitde")
    with pytest.raises(UsageError) as info:
        registry.get("zzz")
    assert "Did you mean" not in str(info.value) and "magnitude" in str(info.value)


def test_duplicate_registration_is_a_bug() -> None:
    registry: Registry[int] = Registry("thing")
    registry.register("a")(1)
    with pytest.raises(ValueError):
        registry.register("a")(2)


def test_entries_registered_in_another_module_are_there_on_first_lookup() -> None:
    """The merge rules register themselves in ``optim.rules``, which imports the module of
    the registry: the registry imports it on its first lookup, in a fresh process too."""
    import subprocess
    import sys

    code = (
        "from omotool.optim.functional import MERGE_RULES; import sys; "
        "print('omotool.optim.rules' in sys.modules, MERGE_RULES.names())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False ['none', 'dare', 'ties']"
