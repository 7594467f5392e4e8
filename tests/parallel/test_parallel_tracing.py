"""`make_context_parallel_traceable`: on an install where Dynamo breaks diffusers' Ulysses graph before the final
all-gather (torch before 2.13 skips funcol's `_maybe_view_chunk_cat`; transformers' `Logger.warning_once`), the fold
declines with a reason that names the fix, and after the fix the model is one graph, folded, with the same output.

The CPU's torch 2.13 inlines `_maybe_view_chunk_cat`, so the tests put the older rule back (`older_torch_rules`) and
install a `warning_once` the way transformers does (an `lru_cache` function on `logging.Logger`)."""
import contextlib
import functools
import logging
import sys

import pytest
import torch

from paro_compile import parallel_tracing
from paro_compile.parallel import context_parallel_tracing_gaps, make_context_parallel_traceable
from tests.parallel import cp_workers as cw

pytest.importorskip("diffusers")

SITE = "blocks.0.attn1#0"
ONE_ORDER = {SITE: ["HWF"] * 4}


@contextlib.contextmanager
def older_torch_rules():
    """Dynamo's rules as torch 2.11 has them (`_maybe_view_chunk_cat` skipped) and transformers' `warning_once` on
    `logging.Logger`; everything restored afterwards."""
    from torch._dynamo import trace_rules

    rules = trace_rules.manual_torch_name_rule_map
    saved_rule = rules.pop(parallel_tracing.CHUNK_CAT, None)
    saved_warning = logging.Logger.__dict__.get("warning_once")
    saved_ignored = set(torch._dynamo.config.ignore_logging_functions)

    @functools.lru_cache(None)
    def warning_once(self, *args, **kwargs):
        self.warning(*args, **kwargs)

    logging.Logger.warning_once = warning_once
    parallel_tracing._clear_rule_caches()
    try:
        yield
    finally:
        if saved_rule is not None:
            rules[parallel_tracing.CHUNK_CAT] = saved_rule
        else:
            rules.pop(parallel_tracing.CHUNK_CAT, None)
        if saved_warning is not None:
            logging.Logger.warning_once = saved_warning
        else:
            del logging.Logger.warning_once
        torch._dynamo.config.ignore_logging_functions.clear()
        torch._dynamo.config.ignore_logging_functions.update(saved_ignored)
        parallel_tracing._clear_rule_caches()


def compiled_wan(world: int) -> dict:
    from torch._dynamo.utils import counters

    from paro_compile.model_inspection import dynamo_graph_breaks, fix_hints

    reports: list = []
    model, out = cw.compile_tiny_wan(world, ONE_ORDER, reports)
    return {"out": out, "folds": [r.context_parallel_fold for r in reports if r.sites],
            "breaks": dict(counters["graph_break"]), "hints": fix_hints(model, dynamo_graph_breaks()),
            "graphs": counters["stats"]["unique_graphs"]}


def tracing_worker(rank: int, world: int) -> dict:
    with older_torch_rules():
        gaps = context_parallel_tracing_gaps()
        broken = compiled_wan(world)
        changes = make_context_parallel_traceable()
        again = make_context_parallel_traceable()
        gaps_after = context_parallel_tracing_gaps()
        fixed = compiled_wan(world)
    return {"gaps": gaps, "broken": broken, "changes": changes, "again": again, "fixed": fixed,
            "gaps_after": gaps_after}


@pytest.fixture(scope="module")
def ranks():
    return cw.run_ranks(tracing_worker, 2)


@pytest.mark.slow
def test_the_older_rules_break_the_graph_and_the_fold_says_how_to_fix_it(ranks):
    for result in ranks:
        assert len(result["gaps"]) == 2 and "_maybe_view_chunk_cat" in result["gaps"][0], result["gaps"]
        broken = result["broken"]
        reasons = "\n".join(broken["breaks"])
        assert "_maybe_view_chunk_cat" in reasons and "warning_once" in reasons, reasons
        [fold] = broken["folds"]
        assert fold.startswith("fold: nothing folded (graph output") and "chunk of the permuted tokens" in fold, fold
        assert "make_context_parallel_traceable()" in fold and "_maybe_view_chunk_cat" in fold, fold
        assert any("make_context_parallel_traceable()" in hint for hint in broken["hints"]), broken["hints"]


@pytest.mark.slow
def test_after_the_fix_one_graph_folds_with_the_same_output(ranks):
    one = compiled_wan(1)
    for result in ranks:
        assert result["changes"] == result["gaps"] and result["again"] == [] and result["gaps_after"] == []
        fixed = result["fixed"]
        assert fixed["breaks"] == {} and fixed["graphs"] == 1 and fixed["hints"] == [], fixed["breaks"]
        [fold] = fixed["folds"]
        assert fold.startswith("fold: order HWF folded"), fold
        # folded or not, every rank's output is the one-process output bit for bit (reference numerics in fp32)
        torch.testing.assert_close(fixed["out"], one["out"], rtol=0, atol=0)
        torch.testing.assert_close(result["broken"]["out"], one["out"], rtol=0, atol=0)


def test_gaps_are_read_without_changing_anything():
    """In this process (the CPU's torch): the listing changes nothing, and the fix is idempotent."""
    from torch._dynamo import trace_rules

    outside = context_parallel_tracing_gaps()
    with older_torch_rules():
        before = dict(trace_rules.manual_torch_name_rule_map), set(torch._dynamo.config.ignore_logging_functions)
        gaps = context_parallel_tracing_gaps()
        assert len(gaps) == 2
        assert (dict(trace_rules.manual_torch_name_rule_map), set(torch._dynamo.config.ignore_logging_functions)) == before
        assert make_context_parallel_traceable() == gaps and make_context_parallel_traceable() == []
    assert context_parallel_tracing_gaps() == outside  # the context put everything back


def test_a_warning_once_that_transformers_adds_later_is_ignored_too(tmp_path, monkeypatch):
    """transformers adds `Logger.warning_once` when its logging module is imported, which diffusers may do after
    the fix was called; the fix imports it first where transformers is installed (a stand-in package here)."""
    package = tmp_path / "transformers"
    (package / "utils").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "utils" / "__init__.py").write_text("")
    (package / "utils" / "logging.py").write_text(
        "import functools, logging\n\n\n@functools.lru_cache(None)\ndef warning_once(self, *args, **kwargs):\n"
        "    self.warning(*args, **kwargs)\n\n\nlogging.Logger.warning_once = warning_once\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_warning = logging.Logger.__dict__.get("warning_once")
    saved_ignored = set(torch._dynamo.config.ignore_logging_functions)
    saved_modules = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "transformers"}
    if saved_warning is not None:
        del logging.Logger.warning_once
    try:
        for name in saved_modules:
            del sys.modules[name]
        changes = make_context_parallel_traceable()
        assert any("warning_once" in change for change in changes), changes
        assert logging.Logger.warning_once in torch._dynamo.config.ignore_logging_functions
        assert not any("warning_once" in gap for gap in context_parallel_tracing_gaps())
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] == "transformers"]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        if saved_warning is not None:
            logging.Logger.warning_once = saved_warning
        elif "warning_once" in logging.Logger.__dict__:
            del logging.Logger.warning_once
        torch._dynamo.config.ignore_logging_functions.clear()
        torch._dynamo.config.ignore_logging_functions.update(saved_ignored)


def test_dynamo_config_stays_loggable_after_the_fix():
    """Dynamo records its config as JSON with every compile's metrics; after the fix adds `warning_once` to
    `ignore_logging_functions` that record must still encode (torch 2.11 kept the set in it: a TypeError logged per
    compile), and the set keeps the function."""
    import json

    from torch._dynamo import utils as dynamo_utils

    with older_torch_rules():
        make_context_parallel_traceable()
        record = dynamo_utils._get_dynamo_config_for_logging()
        assert record is None or isinstance(json.loads(record), dict)
        assert logging.Logger.warning_once in torch._dynamo.config.ignore_logging_functions
