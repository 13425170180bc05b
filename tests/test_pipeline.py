import pytest

from preserve_onnx.errors import PassError, PreserveError
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


def test_disabled_pass_is_skipped_and_unknown_names_refused():
    result = Sequential([Rename(), Refuse()], disabled=["refuse"])(two_layer_mlp())
    assert [name for name, _ in result.results] == ["rename-graph"]
    with pytest.raises(PreserveError, match="--disable: unknown pass 'nope'"):
        Sequential([Rename()], disabled=["nope"])


def test_contract_a_new_model_must_be_reported_as_modified():
    with pytest.raises(TypeError, match="returned a new model but modified=False"):
        Liar()(two_layer_mlp())
