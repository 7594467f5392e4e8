"""`passes/mask_analysis.py` on traced graphs: which axes a mask provably does not vary along, which masks read as
padding, and which in-place writes void the proof."""
import torch
import torch.fx as fx

from paro_compile.passes.mask_analysis import (KEY_AXIS, QUERY_AXIS, constant_axes, mutated, padding_analysis,
                                                padding_form)


def traced(fn, *inputs) -> dict[str, fx.Node]:
    """The nodes of ``fn``'s Dynamo graph by name (fake values attached), for the analysis to read."""
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    return {node.name: node for node in captured["gm"].graph.nodes}


def output_of(nodes: dict[str, fx.Node]) -> fx.Node:
    (out,) = [n for n in nodes.values() if n.op == "output"]
    result = out.args[0]
    return result[0] if isinstance(result, (tuple, list)) else result


VALID = torch.arange(12)[None, :] < torch.tensor([12, 7])[:, None]  # [2, 12]


def test_constant_axes_follow_size_one_repeat_transpose_and_regroups():
    def build(valid):
        rows = valid.view(2, 1, 1, 12).repeat(1, 1, 12, 1)  # constant over query rows
        cols = rows.transpose(2, 3)  # constant over keys
        per_head = rows.repeat_interleave(3, dim=0).view(2, 3, 12, 12)
        return rows, cols, per_head, rows & cols

    nodes = traced(build, VALID)
    out = [n for n in nodes.values() if n.op == "output"][0].args[0]
    rows, cols, per_head, both = out
    assert QUERY_AXIS in constant_axes(rows) and KEY_AXIS not in constant_axes(rows)
    assert KEY_AXIS in constant_axes(cols) and QUERY_AXIS not in constant_axes(cols)
    assert QUERY_AXIS in constant_axes(per_head)
    assert not {QUERY_AXIS, KEY_AXIS} & constant_axes(both)


def test_padding_forms_and_refusals():
    def outer(valid):
        return valid[:, None, :, None] & valid[:, None, None, :]

    def key_only(valid):
        return valid[:, None, None, :].expand(2, 1, 12, 12)

    def causal(valid):
        return valid[:, None, None, :] & torch.ones(12, 12, dtype=torch.bool).tril()

    def negated(valid):
        return ~(valid[:, None, :, None] & valid[:, None, None, :])

    form = padding_form(output_of(traced(outer, VALID)))
    assert form is not None and len(form.keys) == 1 and len(form.queries) == 1 and form.chain == ()
    form = padding_form(output_of(traced(key_only, VALID)))
    assert form is not None and form.queries == ()
    assert padding_form(output_of(traced(causal, VALID))) is None
    assert padding_form(output_of(traced(negated, VALID))) is None


def test_in_place_writes_through_views_void_the_proof():
    def written(valid):
        mask = valid[:, None, :, None] & valid[:, None, None, :]
        mask.transpose(2, 3)[:, :, 0, :] = True
        return mask

    def untouched(valid):
        return valid[:, None, :, None] & valid[:, None, None, :]

    nodes = traced(written, VALID)
    mask = output_of(nodes)
    and_node = next(n for n in nodes.values() if n.op == "call_function" and "and" in str(n.target))
    assert mutated(and_node)
    assert padding_form(mask) is None
    assert padding_analysis(mask) == (None, True)  # padding in form, voided by the write: the refusal can say so
    nodes = traced(untouched, VALID)
    assert not any(mutated(n) for n in nodes.values() if n.op != "output")
    assert padding_analysis(output_of(nodes))[1] is False


def test_refusals_that_are_not_written_in_place_say_so():
    def causal(valid):
        return valid[:, None, None, :] & torch.ones(12, 12, dtype=torch.bool).tril()

    assert padding_analysis(output_of(traced(causal, VALID))) == (None, False)
