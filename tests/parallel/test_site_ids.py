"""Site ids are the module's `named_modules()` name whatever hooks wrap the modules' ``forward`` (diffusers'
HookRegistry: context parallelism, offloading, caches) and whatever characters the names hold."""
import pytest
import torch
import torch.nn.functional as F

from paro_compile.config import ParoConfig
from paro_compile.passes.discover import find_attention_sites, normalize_module_path
from tests.parallel import cp_workers as cw

HOPPED = ("L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].0.forward.func.__closure__[0]"
          ".cell_contents.forward.__self__.attn1")


@pytest.mark.parametrize("dynamo_path, expected", [
    ("L['self'].blocks[0]._modules['attn']", "blocks.0.attn"),
    ("L['self'].__dict__['_modules']['blocks'].0.attn2", "blocks.0.attn2"),
    (HOPPED, "blocks.0.attn1"),
    ("L['function_reference'].forward.__self__", ""),
    ("L['self'].blocks.0.forward.args[0].attn", "blocks.0.attn"),  # functools.partial(forward, module)
    ("L['self'].blocks.0.forward.__wrapped__.__self__.attn", "blocks.0.attn"),
    ("L['self'].fn_ref.original_forward.__self__.attn1", "attn1"),
    ("L['original_forward'].__self__.__dict__['_modules']['blocks'].0.attn1", "blocks.0.attn1"),  # ParaAttention  # a frame rooted at a hook object
    ("getattr(L['self'], 'weird-name')", "weird-name"),
    ("getattr(L['self'], \"quo'te\")", "quo'te"),
    ("getattr(getattr(L['self'], 'a-b'), 'c d').x[3]", "a-b.c d.x.3"),
    ("L['self'].d.a b", "d.a b"),  # Dynamo writes ModuleDict keys raw
    ("L['self'].func.forward.__self__.func", "func.func"),  # a child named like a hop attribute stays
])
def test_normalize_module_path(dynamo_path, expected):
    assert normalize_module_path(dynamo_path) == expected


def test_unparsable_paths_keep_the_textual_rules():
    assert normalize_module_path("L['self'].blocks[0]._modules['attn'](") == "blocks.0.attn("


def _site_ids(model, *args, **kwargs) -> list[str]:
    seen = []

    def backend(gm, example_inputs):
        seen.extend(s.site_id for s in find_attention_sites(gm, ParoConfig(allow_fp32=True)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        model(*args, **kwargs)
        torch.compile(model, backend=backend)(*args, **kwargs)
    return seen


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(64, 192)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 1, 64).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class _OddNames(torch.nn.Module):
    NAMES = ("weird-name", "0start", "quo'te")

    def __init__(self) -> None:
        super().__init__()
        for name in self.NAMES:
            self.add_module(name, _Attention())
        self.d = torch.nn.ModuleDict({"a b": _Attention()})

    def forward(self, x):
        for name in self.NAMES:
            x = getattr(self, name)(x)
        return self.d["a b"](x)


def test_ids_of_modules_whose_names_are_not_identifiers():
    ids = _site_ids(_OddNames(), torch.randn(1, 16, 64))
    assert ids == ["weird-name#0", "0start#0", "quo'te#0", "d.a b#0"]
    names = {name for name, _ in _OddNames().named_modules()}
    assert all(sid.rsplit("#", 1)[0] in names for sid in ids)


def test_diffusers_hooks_leave_site_ids_unchanged():
    pytest.importorskip("diffusers")
    from diffusers.hooks import HookRegistry, ModelHook

    class PassThrough(ModelHook):
        """A hook that changes nothing: what context parallelism and offloading hooks do to the module path."""

    model, inputs = cw.tiny_wan(layers=2)
    plain = _site_ids(model, **inputs)
    # the root (as context parallelism's timestep split), a block (as its hidden-state split and block-level
    # offloading), and an attention module twice (two hooks stack)
    for name, hook_names in (("", ["a"]), ("blocks.0", ["a"]), ("blocks.1.attn1", ["a", "b"]), ("blocks.1", ["a"])):
        registry = HookRegistry.check_if_exists_or_initialize(model.get_submodule(name))
        for hook_name in hook_names:
            registry.register_hook(PassThrough(), hook_name)
    hooked = _site_ids(model, **inputs)
    assert plain == ["blocks.0.attn1#0", "blocks.0.attn2#0", "blocks.1.attn1#0", "blocks.1.attn2#0"]
    assert hooked == plain


def test_plan_of_the_plain_model_applies_under_hooks():
    pytest.importorskip("diffusers")
    from diffusers.hooks import HookRegistry, ModelHook

    import paro_compile

    model, inputs = cw.tiny_wan()
    plan = cw.wan_plan({"blocks.0.attn1#0": ["HWF", "FHW", "WHF", "FWH"]})
    with torch.no_grad():
        torch._dynamo.reset()
        plain = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": plan}))(**inputs)[0]
        for name in ("", "blocks.0"):
            HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).register_hook(ModelHook(), "noop")
        model(**inputs)
        torch._dynamo.reset()
        hooked = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": plan}))(**inputs)[0]
    record = next(s for s in paro_compile.last_report().sites if s.site_id == "blocks.0.attn1#0")
    assert record.lowered and record.orders == ["HWF", "FHW", "WHF", "FWH"]
    assert torch.equal(hooked, plain)
    torch._dynamo.reset()
