import onnx
import pytest

from preserve_onnx.config import PREFETCH_ATTRIBUTES, OptimizeConfig, PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.passes import InsertPrefetchesPass
from tests.builders import G, if_model, ops, two_layer_mlp


def run(model, **kw):
    kw.setdefault("budget", 10_000)
    return InsertPrefetchesPass(OptimizeConfig(**kw))(model)


def test_exact_structure_after_insertion():
    m = two_layer_mlp(16, 32)
    result = run(m, budget=3000, min_chunk=512)
    assert result.modified
    g = result.model.graph
    assert ops(g) == [
        "MatMul",
        "Prefetch(w1)",
        "Prefetch(w2)",
        "AllReduce",
        "MatMul",
        "MatMul",
        "Prefetch(w3)",
        "AllReduce",
        "MatMul",
    ]
    p1, p2, ar = g.node[1], g.node[2], g.node[3]
    assert (p1.name, list(p1.input), list(p1.output), p1.domain) == (
        "ar0/Prefetch/w1",
        ["h0", "w1"],
        ["ar0/Prefetch/w1/out"],
        "preserve",
    )
    assert list(p2.input) == ["ar0/Prefetch/w1/out", "w2"]
    assert list(ar.input) == ["ar0/Prefetch/w2/out"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in p2.attribute}
    # fp32 weights on ascend-910b: 320e12 x 4 B / (2 x 0.85 x 1.6e12) = 470 tokens per step.
    assert attrs == {"max_size": 952, "offset": 0, "collective": b"ar0", "max_tokens": 470}
    # The consumers still read the weights directly.
    assert list(g.node[4].input) == ["a0", "w1"]
    # Each window has its own budget: ar1 gets w3 whole.
    assert list(g.node[7].input) == ["ar1/Prefetch/w3/out"]
    assert [o.domain for o in result.model.opset_import][-1] == "preserve"


def test_input_model_is_not_mutated():
    m = two_layer_mlp()
    before = m.SerializeToString()
    run(m)
    assert m.SerializeToString() == before


def test_same_input_gives_byte_identical_output():
    a = run(two_layer_mlp()).model.SerializeToString()
    b = run(two_layer_mlp()).model.SerializeToString()
    assert a == b


def test_no_collectives_leaves_model_unchanged():
    g = G()
    g.input("x", ["batch", 8])
    g.node("MatMul", ["x", g.weight("w", (8, 8))], ["y"], name="mm")
    g.output("y")
    m = g.model()
    result = run(m)
    assert not result.modified and result.model is m and result.stats.windows == ()


def test_refuses_model_that_already_has_prefetches():
    once = run(two_layer_mlp()).model
    with pytest.raises(PreserveError, match="already contains 3 preserve::Prefetch nodes; pass --replan"):
        run(once)


def test_vendor_naming():
    naming = PrefetchNaming(
        domain="vendor.cmo", op_type="CmoPrefetch", version=2, max_size="size", max_tokens="valid_tokens"
    )
    g = run(two_layer_mlp(), naming=naming).model
    p = g.graph.node[1]
    assert (p.op_type, p.domain) == ("CmoPrefetch", "vendor.cmo")
    assert [a.name for a in p.attribute] == ["collective", "offset", "size", "valid_tokens"]
    assert ("vendor.cmo", 2) in [(o.domain, o.version) for o in g.opset_import]


def test_collective_inside_if_branch_prefetches_outer_weight_inside_branch():
    out = run(if_model()).model
    then_g = (
        out.graph.node[0].attribute[1].g
        if out.graph.node[0].attribute[1].name == "then_branch"
        else out.graph.node[0].attribute[0].g
    )
    assert ops(then_g) == ["Prefetch(w_outer)", "AllReduce", "MatMul"]
    assert [t.name for t in out.graph.initializer] == ["w_outer"]  # the weight stays in the outer graph
    assert [t.name for t in then_g.initializer] == []


def test_max_tokens_only_where_the_window_has_a_limit():
    # A window whose consumer reads KV-cache (attention stays memory-bound at any batch) gets no
    # max_tokens attribute (absent = no limit); a weights-only window gets the roofline bound.
    from tests.builders import G

    g = G()
    g.input("x", ["batch", 8])
    g.input("past", ["batch", 2, "past_seq", 4])
    g.allreduce("x", "a", name="ar0")
    g.node("MatMul", ["a", g.weight("w", (8, 8))], ["h"], name="mm")
    g.node("Concat", ["past", "past"], ["present"], name="cat", axis=2)
    g.allreduce("h", "b", name="ar1")
    g.node("MatMul", ["b", g.weight("w2", (8, 8))], ["y"], name="mm2")
    g.output("y", ["batch", 8])
    g.output("present", ["batch", 2, "total_seq", 4])
    model = run(g.model(), budget=1 << 20).model
    attrs = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "Prefetch"
    }
    assert {name: a.get("max_tokens") for name, a in attrs.items()} == {
        "ar0/Prefetch/w": None,
        "ar0/Prefetch/past": None,
        "ar1/Prefetch/w2": 470,
    }


# -- Prefetch's definition as a model-local function (docs/design.md, "Chain safety") ------------------


def test_the_model_gets_prefetch_as_a_local_function():
    m = two_layer_mlp()
    out = run(m).model
    (fn,) = out.functions
    assert (fn.domain, fn.name, list(fn.input), list(fn.output), list(fn.attribute)) == (
        "preserve",
        "Prefetch",
        ["A", "X", "L"],
        ["Y"],
        list(PREFETCH_ATTRIBUTES),
    )
    assert list(PREFETCH_ATTRIBUTES)[:4] == ["max_size", "offset", "collective", "max_tokens"]
    assert [(n.op_type, n.domain, list(n.input), list(n.output)) for n in fn.node] == [
        ("Identity", "", ["A"], ["Y"])
    ]
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", 17)]  # the model's own default opset
    onnx.checker.check_model(out, full_check=True)


def test_onnx_shape_inference_types_every_prefetch_output_like_its_anchor():
    m = two_layer_mlp(16, 32)
    out = run(m, budget=3000, min_chunk=512).model
    inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    types = {vi.name: vi.type for vi in inferred.graph.value_info}
    prefetches = [n for n in out.graph.node if n.op_type == "Prefetch"]
    assert [n.output[0] for n in prefetches] == [
        "ar0/Prefetch/w1/out",
        "ar0/Prefetch/w2/out",
        "ar1/Prefetch/w3/out",
    ]
    for node in prefetches[:2]:
        assert types[node.output[0]] == types[node.input[0]]
    t = types["ar0/Prefetch/w2/out"].tensor_type
    assert (t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]) == (
        onnx.TensorProto.FLOAT,
        ["batch", 16],
    )
    # ar1's anchor descends from an AllReduce output, which onnx (no com.microsoft schemas) leaves untyped.
    assert "h2" not in types and "ar1/Prefetch/w3/out" not in types


def test_without_the_function_prefetch_outputs_stay_untyped():
    """The negative: what every tool that infers shapes saw before (issue 18, 0 of 13 typed)."""
    out = run(two_layer_mlp()).model
    del out.functions[:]
    inferred = onnx.shape_inference.infer_shapes(out)
    assert not {vi.name for vi in inferred.graph.value_info} & {"ar0/Prefetch/w1/out", "ar1/Prefetch/w3/out"}


def test_a_model_below_ir_version_8_gets_no_function():
    m = two_layer_mlp()
    m.ir_version = 7
    out = run(m).model
    assert [n.op_type for n in out.graph.node].count("Prefetch") == 3
    assert len(out.functions) == 0


def test_refuses_a_model_that_already_defines_the_function():
    out = run(two_layer_mlp()).model
    from preserve_onnx.passes import StripPrefetchesPass

    stripped_nodes = StripPrefetchesPass()(out).model
    stripped_nodes.functions.extend(out.functions)  # a tool removed the nodes and kept the definition
    with pytest.raises(
        PreserveError,
        match=r"^the model already defines a function preserve::Prefetch; "
        r"pass --replan to remove it, or choose another --prefetch-domain$",
    ):
        run(stripped_nodes)


def test_an_unused_import_of_the_prefetch_domain_at_another_version_is_kept_and_stripped_back():
    """onnxruntime's offline optimization imports every registered custom domain (``preserve`` at 1000)."""
    from preserve_onnx.passes import StripPrefetchesPass

    m = two_layer_mlp()
    m.opset_import.append(onnx.helper.make_opsetid("preserve", 1000))
    out = run(m).model
    assert [(o.domain, o.version) for o in out.opset_import] == [
        ("", 17),
        ("com.microsoft", 1),
        ("preserve", 1000),
    ]
    assert StripPrefetchesPass()(out).model.SerializeToString() == m.SerializeToString()


def test_refuses_the_prefetch_domain_at_another_version_when_the_model_uses_it():
    g = G()
    g.input("x", ["batch", 16])
    g.node("MatMul", ["x", g.weight("w0", (16, 16))], ["h0"], name="mm0")
    g.node("Vendor", ["h0"], ["h1"], name="v", domain="preserve")
    g.allreduce("h1", "a0", name="ar0")
    g.node("MatMul", ["a0", g.weight("w1", (16, 16))], ["y"], name="mm1")
    g.output("y", ["batch", 16])
    m = g.model()
    m.opset_import.append(onnx.helper.make_opsetid("preserve", 3))
    with pytest.raises(
        PreserveError,
        match=r"^the model imports domain 'preserve' at version 3, not 1; "
        r"choose another --prefetch-domain$",
    ):
        run(m)
