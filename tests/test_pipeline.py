import pytest

from preserve_onnx.errors import PassError, PreserveError, UsageError
from preserve_onnx.pipeline import Pass, PassResult, Sequential
from tests.builders import two_layer_mlp


class Rename(Pass):
    name = "rename-graph"
    summary = "set the graph name"

    def run(self, model):
        import onnx

        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.name = "renamed"
        return PassResult(out, True, {"renamed": 1})


class Refuse(Pass):
    name = "refuse"
    summary = "always refuses"

    def run(self, model):
        raise PreserveError("no thanks")


class Liar(Pass):
    name = "liar"

    def run(self, model):
        return PassResult(two_layer_mlp(), False)


def test_sequential_threads_the_model_and_keeps_each_result():
    result = Sequential([Rename()])(two_layer_mlp())
    assert result.modified and result.model.graph.name == "renamed"
    assert result.stats("rename-graph") == {"renamed": 1} and result.stats("other") is None


def test_failure_names_the_pass_and_its_predecessors():
    with pytest.raises(PassError, match="^refuse failed after rename-graph: no thanks$"):
        Sequential([Rename(), Refuse()])(two_layer_mlp())
    with pytest.raises(PassError, match="^refuse failed: no thanks$"):
        Sequential([Refuse()])(two_layer_mlp())


class Count(Pass):
    name = "count-nodes"
    kind = "analysis"
    summary = "count the nodes"

    def run(self, model):
        return PassResult(model, False, len(model.graph.node))


class Report(Pass):
    name = "report-count"
    requires = ("count-nodes",)

    def run(self, model, count_nodes=None):
        return PassResult(model, False, f"{count_nodes} nodes")


def test_disabled_pass_is_skipped_and_unknown_names_refused():
    result = Sequential([Rename(), Refuse()], disabled=["refuse"])(two_layer_mlp())
    assert [name for name, _ in result.results] == ["rename-graph"]
    with pytest.raises(UsageError, match=r"^--disable: unknown pass 'nope' \(passes: rename-graph\)$"):
        Sequential([Rename()], disabled=["nope"])
    # A registry name this pipeline does not hold is skipped quietly; one outside it is refused.
    assert Sequential([Rename()], disabled=["refuse"], known=["refuse"]).passes[0].name == "rename-graph"


def test_an_analysis_hands_its_data_to_the_passes_that_require_it():
    model = two_layer_mlp()
    result = Sequential([Count(), Report()])(model)
    assert result.stats("report-count") == f"{len(model.graph.node)} nodes" and not result.modified


def test_an_analysis_cannot_be_disabled():
    with pytest.raises(
        UsageError,
        match="^--disable: 'count-nodes' is an analysis that report-count needs, not a step to skip$",
    ):
        Sequential([Count(), Report()], disabled=["count-nodes"])


def test_contract_a_new_model_must_be_reported_as_modified():
    with pytest.raises(TypeError, match="returned a new model but modified=False"):
        Liar()(two_layer_mlp())
