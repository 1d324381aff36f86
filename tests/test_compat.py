"""The private TRL / transformers / torch names of trl_u2a/_compat.py still exist, with the parameters U2A relies on,
and every private hook U2ATrainer overrides is listed there."""

import importlib
import inspect

import pytest

from trl_u2a import U2ATrainer
from trl_u2a._compat import PRIVATE_NAMES


def _resolve(dotted: str):
    """A module, or an attribute path inside one (`trl.KTOTrainer`, `trl.trainer.utils.FusedCausalLMOutput`)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda e: f"{e.owner}.{e.name}"[:80])
def test_private_name_is_still_there(entry):
    owner = _resolve(entry.owner)
    if entry.kind in ("method", "function"):
        assert hasattr(owner, entry.name), f"{entry.owner}.{entry.name} is gone; U2A uses it because {entry.why}"
        params = tuple(inspect.signature(getattr(owner, entry.name)).parameters)
        assert params == entry.params, (
            f"{entry.owner}.{entry.name} now takes {params}, U2A was written for {entry.params}"
        )
    elif entry.kind == "class_attribute":
        fields = getattr(owner, "__dataclass_fields__", {})
        assert hasattr(owner, entry.name) or entry.name in fields, f"{entry.owner}.{entry.name} is gone"
    elif entry.kind == "attribute":
        sources = [
            inspect.getsource(vars(c)["__init__"]) for c in owner.__mro__ if inspect.isfunction(vars(c).get("__init__"))
        ]
        assert any(f"self.{entry.name} =" in s for s in sources), f"{entry.owner} no longer sets self.{entry.name}"
    elif entry.kind == "source":
        assert entry.name in inspect.getsource(owner), f"{entry.owner} no longer contains {entry.name!r}: {entry.why}"
    else:
        pytest.fail(f"unknown kind {entry.kind!r}")


def test_every_overridden_private_hook_is_registered():
    registered = {e.name for e in PRIVATE_NAMES}
    overridden = {
        name
        for name in vars(U2ATrainer)
        if name.startswith("_")
        and not name.startswith("__")
        and any(hasattr(base, name) for base in U2ATrainer.__mro__[1:])
    }
    assert overridden, "the check found no override at all"
    assert overridden <= registered, (
        f"private hooks overridden but not in trl_u2a/_compat.py: {overridden - registered}"
    )
