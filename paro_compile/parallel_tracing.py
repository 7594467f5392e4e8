"""Let Dynamo trace diffusers' context-parallel hooks whole, so the token order can be folded across the sharding.

Under Ulysses the order paro folds into the sequence before diffusers' token sharding is undone after the final
all-gather (`docs/context_parallel.md`, "Folding under context parallelism"). Both ends must be in the graph that
holds the attention. Two things on the hooks' path break that graph on some installs:

- ``funcol.all_gather_tensor`` along a dimension other than 0 (the output projection's gather hook) calls
  ``torch._utils._maybe_view_chunk_cat``, which Dynamo's trace rules mark as skipped before torch 2.13 (torch 2.13
  lists it as inlined). The graph then ends with this rank's chunk of the permuted tokens, and the fold declines:
  the output stays right, but every permutation runs in the kernels.
- diffusers logs through ``logger.warning_once``, which transformers adds to ``logging.Logger`` (an ``lru_cache``
  function). Dynamo breaks the graph on logger methods it is not told to ignore.

`make_context_parallel_traceable` applies both fixes through Dynamo's own switches (its trace rules and
``torch._dynamo.config.ignore_logging_functions``) and says what it changed. Call it once before the first call of
the compiled model. The logging one drops ``warning_once`` calls inside compiled code only; the eager call that
diffusers' hooks need before tracing still logs them.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Callable

import torch

CHUNK_CAT = "torch._utils._maybe_view_chunk_cat"
"""funcol's re-concatenation of an all-gather along a dimension other than 0."""


def _rules() -> dict:
    from torch._dynamo import trace_rules

    return trace_rules.manual_torch_name_rule_map


def _clear_rule_caches() -> None:
    from torch._dynamo import trace_rules

    clear = getattr(trace_rules, "clear_lru_cache", None)
    if clear is not None:
        clear()
    else:  # pragma: no cover - torch versions without the helper
        trace_rules.get_torch_obj_rule_map.cache_clear()


def _ignored_logging_functions() -> set:
    config = torch._dynamo.config
    name = "ignore_logging_functions" if hasattr(config, "ignore_logging_functions") else "ignore_logger_methods"
    return getattr(config, name)


def _inline_chunk_cat() -> None:
    from torch._dynamo.variables import UserFunctionVariable

    _rules()[CHUNK_CAT] = UserFunctionVariable
    _clear_rule_caches()


def _open_gaps() -> list[tuple[str, Callable[[], None]]]:
    """Each gap open in this process: what breaks the graph, and the Dynamo switch that closes it."""
    from torch._dynamo.variables import UserFunctionVariable

    gaps: list[tuple[str, Callable[[], None]]] = []
    if _rules().get(CHUNK_CAT) is not UserFunctionVariable:
        gaps.append((f"Dynamo skips {CHUNK_CAT} (the final all-gather's re-concatenation)", _inline_chunk_cat))
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None and warning_once not in _ignored_logging_functions():
        gaps.append(("Dynamo breaks the graph on logging.Logger.warning_once (diffusers' hooks log through it)",
                     lambda: _ignore_logging_function(warning_once)))
    return gaps


def _ignore_logging_function(function: Callable) -> None:
    _ignored_logging_functions().add(function)
    _keep_compile_metrics_loggable()


def _keep_compile_metrics_loggable() -> None:
    """Torch 2.11 records Dynamo's config with each compile's metrics as JSON and leaves
    ``ignore_logging_functions`` (a set of functions, not JSON) in it: every compile then logs a TypeError once the set
    holds a function (torch 2.13 leaves the set out, in ``torch._dynamo.utils._get_dynamo_config_for_logging``).
    Where that function fails, it is wrapped to log the config without the set; elsewhere nothing changes."""
    from torch._dynamo import utils as dynamo_utils

    original = getattr(dynamo_utils, "_get_dynamo_config_for_logging", None)
    if original is None or getattr(original, "_paro_without_logging_functions", False):
        return
    try:
        original()
        return
    except TypeError:
        pass

    def config_for_logging():
        try:
            return original()
        except TypeError:
            with torch._dynamo.config.patch(ignore_logging_functions=set()):
                return original()

    config_for_logging._paro_without_logging_functions = True
    dynamo_utils._get_dynamo_config_for_logging = config_for_logging


def context_parallel_tracing_gaps() -> list[str]:
    """What would break Dynamo's graph on diffusers' context-parallel path in this process (empty: nothing)."""
    return [gap for gap, _ in _open_gaps()]


def _import_transformers_logging() -> None:
    """transformers puts ``warning_once`` on ``logging.Logger`` when its logging module is first imported, which can
    happen after this call (diffusers and torchao import transformers lazily); a method that does not exist yet cannot
    be named to Dynamo, so import it now where transformers is installed."""
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
        return
    try:
        importlib.import_module("transformers.utils.logging")
    except ImportError:  # a broken transformers install: diffusers would fail on it too, with its own message
        pass


def make_context_parallel_traceable() -> list[str]:
    """Close the gaps `context_parallel_tracing_gaps` lists, for this process; returns what was changed (empty when
    nothing needed to be). Idempotent. Where transformers is installed, its ``Logger.warning_once`` is loaded first,
    so the order of imports does not matter."""
    _import_transformers_logging()
    gaps = _open_gaps()
    for _, close in gaps:
        close()
    return [gap for gap, _ in gaps]
